//! The AWS side against moto_server on 127.0.0.1 (started here): AMIs over EBS direct
//! upload in three regions, SSM parameters, idempotent re-runs, killed clients and
//! killed servers, the boot-test gate, deregistration, Packer, exports, fleets
//! (CloudFormation deploy, gated rollout with automatic rollback, manual rollback),
//! and update feeds in S3.
//!
//! The images published here are small synthetic disks recorded in a throw-away
//! registry (with a boot-test run), so that the AWS side is tested on its own; the
//! default image's own build and boot test are in image.rs and boot.rs.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{devos_build_command, gpg_verifies, ok, run};
use devos_aws::{
    Credentials, sdk_autoscaling, sdk_cloudformation, sdk_ebs, sdk_ec2, sdk_s3, sdk_ssm,
};
use devos_build::store::registry::{Booted, Registry, TestRun};
use devos_tests::{Moto, Steps, require, wait_for};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 512 * 1024;
const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-2"];

struct Fixture {
    moto: Moto,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            moto: Moto::start().unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn registry(&self) -> PathBuf {
        self.dir.path().join("registry.db")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = devos_build_command();
        c.env("DEVOS_REGISTRY", self.registry())
            .env("DEVOS_CONFIG", self.dir.path().join("config.toml"))
            .env("HOME", self.dir.path())
            .env("DEVOS_KEYS", self.dir.path().join("keys"))
            .envs(self.moto.env())
            .args(args);
        std::fs::write(
            self.dir.path().join("config.toml"),
            "[publish]\nworkers = 4\n",
        )
        .unwrap();
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args), 5)
    }

    /// `fleet ARGS --region us-east-1`.
    fn fleet_in_region(&self, args: &[&str]) -> Output {
        let mut all = vec!["fleet"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--region", "us-east-1"]);
        self.run(&all)
    }

    /// The stack's rollouts, newest first: "KIND TO STATE".
    fn history(&self, stack: &str) -> Vec<String> {
        let history = self.json(&["fleet", "history", "--stack", stack, "--json"]);
        let field = |r: &Value, k: &str| r[k].as_str().unwrap().to_owned();
        history
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}",
                    field(r, "kind"),
                    field(r, "to"),
                    field(r, "state")
                )
            })
            .collect()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A synthetic version: a raw disk of `mib` MiB with data in `blocks` (block
    /// indices; one more block is written with explicit zeros), recorded in the
    /// registry, boot-tested with the given outcome (None: never tested).
    fn version(&self, version: &str, mib: u64, blocks: &[u64], tested: Option<bool>) -> PathBuf {
        self.version_with(version, mib, blocks, tested, json!({}))
    }

    /// [`Fixture::version`] with more manifest keys (`extra`, an object).
    fn version_with(
        &self,
        version: &str,
        mib: u64,
        blocks: &[u64],
        tested: Option<bool>,
        extra: Value,
    ) -> PathBuf {
        let dir = self.dir.path().join(format!("images/{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("disk.raw");
        let mut f = std::fs::File::create(&raw).unwrap();
        f.set_len(mib * MIB).unwrap();
        for &b in blocks {
            f.seek(SeekFrom::Start(b * BLOCK)).unwrap();
            let data: Vec<u8> = (0..BLOCK).map(|i| (i as u8) ^ (b as u8) ^ 0x5a).collect();
            f.write_all(&data).unwrap();
        }
        f.seek(SeekFrom::Start(3 * BLOCK)).unwrap();
        f.write_all(&vec![0u8; BLOCK as usize]).unwrap();
        drop(f);
        std::fs::write(
            dir.join("devos-agent_0.1.0_amd64.deb"),
            b"not a real package",
        )
        .unwrap();
        std::fs::write(dir.join("agent.toml"), "log-level = \"info\"\n").unwrap();
        let sha = devos_build::support::digest::file_sha256(&raw).unwrap();
        let manifest = json!({
            "name": "devos-pub", "version": version, "build_id": format!("{:0>64}", version.replace(['.', '+'], "")),
            "description": "test", "distro": "debian", "suite": "bookworm",
            "builder_version": "test", "source_date_epoch": 0, "kernel_cmdline": "",
            "inputs": [], "package_sources": "", "packages": [], "partitions": [],
            "agent": {"file": "devos-agent_0.1.0_amd64.deb", "version": "0.1.0", "sha256": "0"},
            "artifacts": [{"file": "disk.raw", "format": "raw", "sha256": sha, "size": mib * MIB, "used_bytes": 0}],
            "stages": [], "cache_keys": {"base": "", "tree": ""}
        });
        let mut manifest = manifest;
        if !extra.as_object().unwrap().is_empty() {
            for (k, v) in extra.as_object().unwrap() {
                manifest[k] = v.clone();
            }
            // What reads the version's files reads its manifest, as in a real build.
            std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        }
        let mut reg = Registry::open(&self.registry()).unwrap();
        reg.record_build(
            &dir,
            Path::new("images/devos-pub.toml"),
            &serde_json::from_value(manifest).unwrap(),
            &[],
        )
        .unwrap();
        if let Some(passed) = tested {
            let run = TestRun {
                started_at: 1,
                passed,
                accelerator: "tcg".into(),
                seconds: 1.0,
                raw_sha256: None,
                failure: None,
            };
            let booted = Booted {
                file: "disk.raw",
                sha256: &sha,
            };
            reg.record_test("devos-pub", version, &run, &booted, &json!({}))
                .unwrap();
        }
        raw
    }

    /// A passing version of a verified image whose update bundle (root, hash tree,
    /// UKI: synthetic bytes) trusts the key `fingerprint`; the bundle's file names.
    /// Make the builder's keys (in this fixture's key directory): the signing key's
    /// fingerprint.
    fn builder_key(&self) -> String {
        require("gpg", "gpg");
        ok(&self.run(&["keys", "generate"]));
        self.json(&["keys", "show", "--json"])["fingerprint"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn updatable_version(&self, version: &str, fingerprint: &str) -> Vec<String> {
        self.updatable_version_tested(version, fingerprint, Some(true))
    }

    /// [`Fixture::updatable_version`] with its boot test's outcome (`None`: untested).
    fn updatable_version_tested(
        &self,
        version: &str,
        fingerprint: &str,
        tested: Option<bool>,
    ) -> Vec<String> {
        let dir = self.dir.path().join(format!("images/{version}"));
        let bundle = dir.join("update");
        std::fs::create_dir_all(&bundle).unwrap();
        let stem = format!("devos-pub_{version}");
        let mut files = Vec::new();
        let mut update = Vec::new();
        for (i, name) in [
            format!("{stem}+00000001-0000-4000-8000-000000000001.root"),
            format!("{stem}+00000002-0000-4000-8000-000000000002.verity"),
            format!("{stem}.efi"),
        ]
        .into_iter()
        .enumerate()
        {
            let bytes: Vec<u8> = (0..(64 * 1024 + i))
                .map(|b| (b as u8) ^ version.as_bytes()[2])
                .collect();
            std::fs::write(bundle.join(&name), &bytes).unwrap();
            let sha = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
            update.push(json!({"file": name, "sha256": sha, "size": bytes.len()}));
            files.push(name);
        }
        self.version_with(
            version,
            1,
            &[0],
            tested,
            json!({
                "update": update,
                "update_feed": {"url": "https://updates.example.com/devos-pub/", "key_fingerprint": fingerprint},
            }),
        );
        files
    }

    fn s3(&self) -> sdk_s3::Client {
        self.sdk("us-east-1", |c| {
            sdk_s3::Client::from_conf(
                sdk_s3::config::Builder::from(c)
                    .force_path_style(true)
                    .build(),
            )
        })
    }

    fn sdk<C>(&self, region: &str, make: impl FnOnce(&aws_types::SdkConfig) -> C) -> C {
        let conf = aws_types::SdkConfig::builder()
            .behavior_version(sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_types::region::Region::new(region.to_owned()))
            .endpoint_url(self.moto.endpoint())
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(Credentials::new(
                    "testing", "testing", None, None, "test",
                )),
            )
            .build();
        make(&conf)
    }

    fn ec2(&self, region: &str) -> sdk_ec2::Client {
        self.sdk(region, sdk_ec2::Client::new)
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// (image ids, snapshot ids) tagged with the build id of `version` in `region`.
    fn resources(&self, region: &str, build_id: &str) -> (Vec<String>, Vec<String>) {
        let ec2 = self.ec2(region);
        let filter = sdk_ec2::types::Filter::builder()
            .name("tag:devos:build-id")
            .values(build_id)
            .build();
        self.block_on(async {
            let images = ec2
                .describe_images()
                .owners("self")
                .filters(filter.clone())
                .send()
                .await
                .unwrap();
            let snaps = ec2
                .describe_snapshots()
                .owner_ids("self")
                .filters(filter)
                .send()
                .await
                .unwrap();
            (
                images
                    .images()
                    .iter()
                    .filter_map(|i| i.image_id().map(str::to_owned))
                    .collect(),
                snaps
                    .snapshots()
                    .iter()
                    .filter_map(|s| s.snapshot_id().map(str::to_owned))
                    .collect(),
            )
        })
    }

    /// How a fleet stack's instances are reached over SSH, from the resources: the key
    /// pair of its launch template, and the ranges its security group admits to port 22.
    fn ssh_access(&self, stack: &str) -> (Option<String>, Vec<String>) {
        let key = self.launch_template(stack).key_name().map(str::to_owned);
        let sg = self.resource_id(stack, "SecurityGroup");
        let ec2 = self.ec2("us-east-1");
        self.block_on(async {
            let groups = ec2
                .describe_security_groups()
                .group_ids(sg)
                .send()
                .await
                .unwrap();
            let ranges = groups.security_groups()[0]
                .ip_permissions()
                .iter()
                .filter(|p| p.from_port() == Some(22) && p.to_port() == Some(22))
                .flat_map(|p| p.ip_ranges())
                .filter_map(|r| r.cidr_ip().map(str::to_owned))
                .collect();
            (key, ranges)
        })
    }

    /// What the latest version of `stack`'s launch template asks for.
    fn launch_template(&self, stack: &str) -> sdk_ec2::types::ResponseLaunchTemplateData {
        let lt = self.resource_id(stack, "LaunchTemplate");
        let ec2 = self.ec2("us-east-1");
        self.block_on(async {
            let versions = ec2
                .describe_launch_template_versions()
                .launch_template_id(lt)
                .versions("$Latest")
                .send()
                .await
                .unwrap();
            versions.launch_template_versions()[0]
                .launch_template_data()
                .unwrap()
                .clone()
        })
    }

    /// What a fleet stack really runs, read straight from the APIs: the AMI of the
    /// launch template version its group uses, and each group instance with its AMI.
    /// None while the group cannot be read (moto recreates it on an update).
    fn group(&self, stack: &str) -> Option<(String, Vec<(String, String)>)> {
        let region = "us-east-1";
        let cf = self.sdk(region, sdk_cloudformation::Client::new);
        let asg = self.sdk(region, sdk_autoscaling::Client::new);
        let ec2 = self.ec2(region);
        self.block_on(async {
            let r = cf
                .describe_stack_resource()
                .stack_name(stack)
                .logical_resource_id("Group")
                .send()
                .await
                .ok()?;
            let group = r
                .stack_resource_detail()?
                .physical_resource_id()?
                .to_owned();
            let groups = asg
                .describe_auto_scaling_groups()
                .auto_scaling_group_names(&group)
                .send()
                .await
                .ok()?;
            let g = groups.auto_scaling_groups().first()?;
            let lt = g.launch_template()?;
            let versions = ec2
                .describe_launch_template_versions()
                .launch_template_id(lt.launch_template_id()?)
                .versions(lt.version()?)
                .send()
                .await
                .ok()?;
            let lt_image = versions
                .launch_template_versions()
                .first()?
                .launch_template_data()?
                .image_id()?
                .to_owned();
            let ids: Vec<String> = g
                .instances()
                .iter()
                .filter_map(|i| i.instance_id().map(str::to_owned))
                .collect();
            let mut instances = Vec::new();
            if !ids.is_empty() {
                let out = ec2
                    .describe_instances()
                    .set_instance_ids(Some(ids))
                    .send()
                    .await
                    .ok()?;
                for i in out.reservations().iter().flat_map(|r| r.instances()) {
                    instances.push((i.instance_id()?.to_owned(), i.image_id()?.to_owned()));
                }
            }
            Some((lt_image, instances))
        })
    }

    /// The physical id of resource `logical` of `stack` (in us-east-1).
    fn resource_id(&self, stack: &str, logical: &str) -> String {
        let cf = self.sdk("us-east-1", sdk_cloudformation::Client::new);
        self.block_on(async {
            let r = cf
                .describe_stack_resource()
                .stack_name(stack)
                .logical_resource_id(logical)
                .send()
                .await
                .unwrap();
            r.stack_resource_detail()
                .unwrap()
                .physical_resource_id()
                .unwrap()
                .to_owned()
        })
    }

    /// The foundation models the agents' role of `stack` may invoke, as deployed
    /// (sorted; `*` for every one).
    fn role_models(&self, stack: &str) -> Vec<String> {
        let cf = self.sdk("us-east-1", sdk_cloudformation::Client::new);
        let body = self.block_on(async {
            let t = cf.get_template().stack_name(stack).send().await.unwrap();
            t.template_body().unwrap().to_owned()
        });
        let mut models: Vec<String> = body
            .lines()
            .filter_map(|l| l.split_once(":foundation-model/"))
            .map(|(_, model)| model.trim_end_matches('"').to_owned())
            .collect();
        models.sort();
        models
    }

    /// A fleet's Auto Scaling group: its name, its suspended processes (sorted) and its
    /// `devos:suspended` tag.
    fn processes(&self, stack: &str) -> (String, Vec<String>, Option<String>) {
        let group = self.resource_id(stack, "Group");
        let asg = self.sdk("us-east-1", sdk_autoscaling::Client::new);
        let (suspended, tag) = self.block_on(suspended(&asg, &group));
        (group, suspended, tag)
    }

    /// The root volume `stack`'s launch template asks for: device, encrypted, GiB.
    fn root_volume(&self, stack: &str) -> (String, bool, i32) {
        let data = self.launch_template(stack);
        let [mapping] = data.block_device_mappings() else {
            panic!("one block device mapping: {data:?}");
        };
        let ebs = mapping.ebs().unwrap();
        (
            mapping.device_name().unwrap().to_owned(),
            ebs.encrypted().unwrap_or(false),
            ebs.volume_size().unwrap_or(0),
        )
    }

    /// The AMI of the launch template version a fleet's group uses, and the AMIs of the
    /// group's instances.
    fn fleet(&self, stack: &str) -> (String, Vec<String>) {
        let (lt_image, instances) = self
            .group(stack)
            .unwrap_or_else(|| panic!("cannot read the group of stack {stack}"));
        (
            lt_image,
            instances.into_iter().map(|(_, ami)| ami).collect(),
        )
    }

    /// The AMI of the instance of an instance stack.
    fn instance_image(&self, stack: &str) -> String {
        let id = self.resource_id(stack, "Instance");
        let ec2 = self.ec2("us-east-1");
        self.block_on(async {
            let out = ec2
                .describe_instances()
                .instance_ids(id)
                .send()
                .await
                .unwrap();
            out.reservations()[0].instances()[0]
                .image_id()
                .unwrap()
                .to_owned()
        })
    }

    /// Once an instance of `stack` on `ami` is up (within 45 s), mark it Unhealthy, as
    /// Auto Scaling does when an instance fails its checks; returns its id.
    fn sicken(&self, stack: &str, ami: &str) -> String {
        let mut sick = Vec::new();
        assert!(
            wait_for(Duration::from_secs(45), || {
                sick = self.instances_on(stack, ami);
                !sick.is_empty()
            }),
            "no instance of {stack} on {ami} appeared"
        );
        let asg = self.sdk("us-east-1", sdk_autoscaling::Client::new);
        self.block_on(async {
            asg.set_instance_health()
                .instance_id(&sick[0])
                .health_status("Unhealthy")
                .send()
                .await
                .unwrap();
        });
        sick.swap_remove(0)
    }

    /// The group's instances on `ami`.
    fn instances_on(&self, stack: &str, ami: &str) -> Vec<String> {
        let (_, instances) = self.group(stack).unwrap_or_default();
        instances
            .into_iter()
            .filter(|(_, image)| image == ami)
            .map(|(id, _)| id)
            .collect()
    }

    /// The tags of AMI `ami` in `region`.
    fn ami_tags(&self, region: &str, ami: &str) -> std::collections::BTreeMap<String, String> {
        self.block_on(async {
            let out = self
                .ec2(region)
                .describe_images()
                .image_ids(ami)
                .send()
                .await
                .unwrap();
            out.images()[0]
                .tags()
                .iter()
                .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
                .collect()
        })
    }

    fn parameter(&self, region: &str, name: &str) -> Option<String> {
        let ssm = self.sdk(region, sdk_ssm::Client::new);
        self.block_on(async {
            ssm.get_parameter()
                .name(name)
                .send()
                .await
                .ok()?
                .parameter()?
                .value()
                .map(str::to_owned)
        })
    }
}

fn build_id(version: &str) -> String {
    format!("{:0>64}", version.replace(['.', '+'], ""))
}

/// A command's stdout as JSON; its output in the panic if it is not.
fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// The command failed, saying `why` on stderr.
#[track_caller]
fn refused(out: &Output, why: &str) {
    assert!(!out.status.success(), "succeeded: {}", stderr(out));
    assert!(stderr(out).contains(why), "{}", stderr(out));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn publish_ami_in_three_regions_idempotent_promote_deregister() {
    let steps = Steps::default();
    steps.at("set up");
    let fx = Fixture::new();
    let version = "0.1.0+aaaaaaaaaaaa";
    let id = build_id(version);
    let data = [0, 1, 7, 40, 79];
    let raw = fx.version(version, 40, &data, None);
    let reference = format!("devos-pub@{version}");
    let publish = |extra: &[&str]| {
        let mut args = vec![
            "publish",
            "ami",
            reference.as_str(),
            "--region",
            "us-east-1",
            "--copy-to",
            "eu-west-1,ap-southeast-2",
            "--json",
        ];
        args.extend_from_slice(extra);
        fx.run(&args)
    };

    // Never tested: refused, nothing created.
    steps.at("Never tested");
    let out = publish(&[]);
    refused(&out, "has not been boot-tested");
    assert_eq!(fx.resources("us-east-1", &id), (vec![], vec![]));

    // Tested: published everywhere.
    steps.at("Tested");
    Registry::open(&fx.registry())
        .unwrap()
        .record_test(
            "devos-pub",
            version,
            &TestRun {
                started_at: 2,
                passed: true,
                accelerator: "tcg".into(),
                seconds: 1.0,
                raw_sha256: None,
                failure: None,
            },
            &Booted {
                file: "disk.raw",
                sha256: &devos_build::support::digest::file_sha256(&raw).unwrap(),
            },
            &json!({}),
        )
        .unwrap();
    // A dry run names the upload and both copies, and creates nothing.
    let dry = publish(&["--dry-run"]);
    ok(&dry);
    let plan: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(plan["dry_run"], true, "{plan}");
    let would = plan["would"].as_array().unwrap();
    assert_eq!(would.len(), 3, "{plan}");
    assert!(would[0].as_str().unwrap().starts_with("upload "), "{plan}");
    assert_eq!(fx.resources("us-east-1", &id), (vec![], vec![]));
    // While another devos-build publishes or deregisters the version, it waits its turn.
    let publication_lock = || {
        let busy = std::fs::File::create(
            fx.registry()
                .with_file_name(format!("registry.db.ami-{id}.lock")),
        )
        .unwrap();
        busy.try_lock().unwrap();
        busy
    };
    let busy = publication_lock();
    refused(
        &publish(&[]),
        &format!("another devos-build is publishing or deregistering {reference}"),
    );
    assert_eq!(fx.resources("us-east-1", &id), (vec![], vec![]));
    drop(busy);
    let out = publish(&[]);
    ok(&out);
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        first["upload"]["blocks_sent"],
        data.len(),
        "only the non-zero blocks are sent: {first}"
    );
    assert_eq!(first["upload"]["image_bytes"], 40 * MIB);
    let regions = first["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 3);
    let parameter = "/devos/images/devos-pub/0.1.0_aaaaaaaaaaaa/image_id";
    for r in regions {
        let region = r["region"].as_str().unwrap();
        let ami = r["ami_id"].as_str().unwrap();
        assert_eq!(r["created"], true);
        let (images, _) = fx.resources(region, &id);
        assert_eq!(images, [ami], "{region}");
        let tags = fx.ami_tags(region, ami);
        assert_eq!(tags["devos:version"], version);
        assert_eq!(tags["devos:image"], "devos-pub");
        assert_eq!(
            tags["devos:sha256"],
            devos_build::support::digest::file_sha256(&raw).unwrap()
        );
        assert_eq!(tags["devos:boot-test"], "passed");
        assert_eq!(
            fx.parameter(region, parameter).as_deref(),
            Some(ami),
            "{region}"
        );
    }
    let primary_snapshots = fx.resources("us-east-1", &id).1;
    assert_eq!(primary_snapshots.len(), 1, "{primary_snapshots:?}");

    // The snapshot reads back through the EBS direct API equal to the raw image.
    steps.at("The snapshot reads back through the EBS direct API equal to the...");
    let v = fx.json(&[
        "publish",
        "verify",
        &reference,
        "--region",
        "us-east-1",
        "--json",
    ]);
    assert_eq!(v["blocks"], 80);
    // And independently of `publish verify`: the listed blocks are exactly the data.
    let ebs = fx.sdk("us-east-1", sdk_ebs::Client::new);
    let listed = fx.block_on(async {
        ebs.list_snapshot_blocks()
            .snapshot_id(&primary_snapshots[0])
            .send()
            .await
            .unwrap()
    });
    let mut indices: Vec<i32> = listed
        .blocks()
        .iter()
        .filter_map(|b| b.block_index())
        .collect();
    indices.sort_unstable();
    assert_eq!(indices, data.map(|b| b as i32));

    // A snapshot that is not the raw image (the publication pointed at one uploaded from
    // a copy with one byte of block 7 changed) fails verification at that block.
    steps.at("A snapshot that differs is found at its first differing block");
    let other = fx.dir.path().join("other.raw");
    std::fs::copy(&raw, &other).unwrap();
    common::flip_byte_at(&other, 7 * BLOCK + 100);
    let (_, _, other_sha) = devos_aws::ebs::nonzero_blocks(&other).unwrap();
    let other_snapshot = fx.block_on(async {
        let id = devos_aws::ebs::start(&ebs, "us-east-1", &other, "not the image", &[])
            .await
            .unwrap();
        devos_aws::ebs::upload(&ebs, "us-east-1", &id, &other, &other_sha, 2, &|_, _| {})
            .await
            .unwrap();
        id
    });
    let point_at = |from: &str, to: &str| {
        rusqlite::Connection::open(fx.registry())
            .unwrap()
            .execute(
                "UPDATE publications SET snapshot_id = ?1 WHERE snapshot_id = ?2",
                [to, from],
            )
            .unwrap()
    };
    assert_eq!(point_at(&primary_snapshots[0], &other_snapshot), 1);
    refused(
        &fx.run(&["publish", "verify", &reference, "--region", "us-east-1"]),
        &format!(
            "snapshot {other_snapshot} differs from {} at block 7 (byte offset {})",
            raw.display(),
            7 * BLOCK
        ),
    );
    assert_eq!(point_at(&other_snapshot, &primary_snapshots[0]), 1);

    // A re-run creates nothing.
    steps.at("A re-run creates nothing");
    let again: Value = serde_json::from_slice(&publish(&[]).stdout).unwrap();
    assert!(again["upload"].is_null(), "{again}");
    for r in again["regions"].as_array().unwrap() {
        assert_eq!(r["created"], false, "{again}");
    }
    for region in REGIONS {
        assert_eq!(fx.resources(region, &id).0.len(), 1, "{region}");
    }
    assert_eq!(fx.resources("us-east-1", &id).1, primary_snapshots);
    // And a dry run now has nothing to do: exit code 3.
    assert_eq!(publish(&["--dry-run"]).status.code(), Some(3));

    // Promote: latest points at it in every region (a dry run first changes nothing;
    // after the promotion it has nothing to do).
    steps.at("Promote");
    let plan = fx.json(&["publish", "promote", &reference, "--dry-run", "--json"]);
    assert_eq!(plan["would"].as_array().unwrap().len(), 3, "{plan}");
    for region in REGIONS {
        assert_eq!(fx.parameter(region, "/devos/images/devos-pub/latest"), None);
    }
    ok(&fx.run(&["publish", "promote", &reference]));
    let again = fx.run(&["publish", "promote", &reference, "--dry-run"]);
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    let ami = |region: &str| {
        regions.iter().find(|r| r["region"] == region).unwrap()["ami_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for region in REGIONS {
        assert_eq!(
            fx.parameter(region, "/devos/images/devos-pub/latest"),
            Some(ami(region))
        );
    }
    let list = fx.json(&["publish", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 3);

    // Deregister: refused while latest points at it, then everything goes.
    steps.at("Deregister");
    let out = fx.run(&["publish", "deregister", &reference]);
    refused(&out, "promote another version first");
    // The dry run refuses as the real run does, and with --force names all three.
    let dry = fx.run(&["publish", "deregister", &reference, "--dry-run"]);
    assert!(stderr(&dry).contains("promote another version first"));
    let plan = fx.json(&[
        "publish",
        "deregister",
        &reference,
        "--force",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(plan["would"].as_array().unwrap().len(), 3, "{plan}");
    assert_eq!(fx.resources("us-east-1", &id).1, primary_snapshots);
    let busy = publication_lock();
    refused(
        &fx.run(&["publish", "deregister", &reference, "--force"]),
        &format!("another devos-build is publishing or deregistering {reference}"),
    );
    for region in REGIONS {
        assert_eq!(fx.resources(region, &id).0.len(), 1, "{region}");
    }
    drop(busy);
    ok(&fx.run(&["publish", "deregister", &reference, "--force"]));
    let none = fx.run(&["publish", "deregister", &reference, "--dry-run"]);
    assert_eq!(none.status.code(), Some(3), "{}", stderr(&none));
    for region in REGIONS {
        assert_eq!(fx.resources(region, &id), (vec![], vec![]), "{region}");
        assert_eq!(fx.parameter(region, parameter), None);
    }
    let list = fx.json(&["publish", "list", "--json"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "deregistered"),
        "{list}"
    );
}

#[test]
fn killed_client_and_killed_server_leave_no_orphans() {
    let mut fx = Fixture::new();
    // 96 MiB of data: long enough to be caught mid-upload.
    let version = "0.2.0+bbbbbbbbbbbb";
    let id = build_id(version);
    let blocks: Vec<u64> = (0..192).collect();
    fx.version(version, 128, &blocks, Some(true));
    let reference = format!("devos-pub@{version}");
    let args = [
        "publish",
        "ami",
        reference.as_str(),
        "--region",
        "us-east-1",
        "--json",
    ];
    let uploading = |fx: &Fixture| !fx.resources("us-east-1", &id).1.is_empty();

    // SIGKILL the client mid-upload: a pending snapshot stays behind.
    let mut child = fx
        .cmd(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || uploading(&fx)),
        "the upload never started"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let (images, leftover) = fx.resources("us-east-1", &id);
    assert!(images.is_empty());
    assert_eq!(leftover.len(), 1);

    // The re-run removes it, uploads again and completes: one snapshot, one AMI.
    let out = fx.run(&args);
    ok(&out);
    assert!(
        stderr(&out).contains(&format!("removing {}", leftover[0])),
        "{}",
        stderr(&out)
    );
    let (images, snaps) = fx.resources("us-east-1", &id);
    assert_eq!(images.len(), 1);
    assert_eq!(snaps.len(), 1);
    assert_ne!(snaps[0], leftover[0]);

    // Kill the server mid-upload of another version: the client fails with a clear
    // error naming the call and the endpoint problem.
    let version = "0.3.0+cccccccccccc";
    let id3 = build_id(version);
    fx.version(version, 128, &blocks, Some(true));
    let reference = format!("devos-pub@{version}");
    let args = [
        "publish",
        "ami",
        reference.as_str(),
        "--region",
        "us-east-1",
        "--json",
    ];
    let child = fx
        .cmd(&args)
        .env("AWS_MAX_ATTEMPTS", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || !fx
            .resources("us-east-1", &id3)
            .1
            .is_empty()),
        "the upload never started"
    );
    fx.moto.kill();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("ebs:PutSnapshotBlock in us-east-1 failed")
            || err.contains("ec2:DeleteSnapshot"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was recorded as published.
    let list: Value =
        serde_json::from_slice(&fx.run(&["publish", "list", "devos-pub", "--json"]).stdout)
            .unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|p| p["version"] != version),
        "{list}"
    );

    // Server back (empty, as after an outage); the re-run completes with no orphans.
    fx.moto.restart().unwrap();
    ok(&fx.run(&args));
    let (images, snaps) = fx.resources("us-east-1", &id3);
    assert_eq!((images.len(), snaps.len()), (1, 1));
    ok(&fx.run(&["publish", "verify", &reference, "--region", "us-east-1"]));
}

#[test]
fn a_failure_after_the_upload_removes_what_the_run_created() {
    let fx = Fixture::new();
    let version = "0.8.0+888888888888";
    let id = build_id(version);
    fx.version(version, 8, &[0, 2], Some(true));
    // `publish ami VERSION` to us-east-1 and `copy_to`, which must fail having removed
    // what it made: its stderr.
    let failed_publish = |version: &str, copy_to: &str| {
        let mut c = fx.cmd(&[
            "publish",
            "ami",
            &format!("devos-pub@{version}"),
            "--region",
            "us-east-1",
            "--copy-to",
            copy_to,
        ]);
        c.env("AWS_MAX_ATTEMPTS", "1");
        let out = run(&mut c, 2);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("everything this run created was removed"),
            "{err}"
        );
        err
    };
    // The copy to a region the endpoint does not know fails after the snapshot and
    // the AMI were made in us-east-1.
    let err = failed_publish(version, "xx-nowhere-9");
    assert!(
        err.contains("ec2:DescribeImages in xx-nowhere-9 failed: the endpoint answered HTTP 500"),
        "{err}"
    );
    assert_eq!(fx.resources("us-east-1", &id), (vec![], vec![]));
    let list = fx.json(&["publish", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");

    // A parameter that cannot take a new version (100 kept, the oldest labelled) fails
    // the last step in the copy's region: the parameter already written in the first
    // region goes with the AMIs it named; the one that was there stays as it was.
    let version = "0.8.1+888888888889";
    let id = build_id(version);
    fx.version(version, 8, &[0, 2], Some(true));
    let parameter = format!(
        "/devos/images/devos-pub/{}/image_id",
        version.replace('+', "_")
    );
    let ssm = fx.sdk("eu-west-1", sdk_ssm::Client::new);
    fx.block_on(async {
        for i in 0..100 {
            ssm.put_parameter()
                .name(&parameter)
                .value(format!("kept-{i}"))
                .r#type(sdk_ssm::types::ParameterType::String)
                .overwrite(true)
                .send()
                .await
                .unwrap();
        }
        ssm.label_parameter_version()
            .name(&parameter)
            .parameter_version(1)
            .labels("keep")
            .send()
            .await
            .unwrap();
    });
    let err = failed_publish(version, "eu-west-1");
    assert!(
        err.contains("ssm:PutParameter in eu-west-1 failed"),
        "{err}"
    );
    assert_eq!(fx.resources("us-east-1", &id), (vec![], vec![]));
    assert_eq!(fx.resources("eu-west-1", &id), (vec![], vec![]));
    assert_eq!(fx.parameter("us-east-1", &parameter), None);
    assert_eq!(
        fx.parameter("eu-west-1", &parameter).as_deref(),
        Some("kept-99")
    );
    let list = fx.json(&["publish", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
}

#[test]
fn publish_ami_stopped_by_a_signal_removes_what_it_made() {
    let fx = Fixture::new();
    let version = "0.9.0+999999999999";
    let id = build_id(version);
    // Enough blocks that the upload is still going when the signal comes.
    let blocks: Vec<u64> = (0..1024).collect();
    fx.version(version, 512, &blocks, Some(true));
    let reference = format!("devos-pub@{version}");
    for signal in ["-INT", "-TERM"] {
        let child = fx
            .cmd(&["publish", "ami", &reference, "--region", "us-east-1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_for(Duration::from_secs(60), || !fx
                .resources("us-east-1", &id)
                .1
                .is_empty()),
            "the upload never started"
        );
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let out = child.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "{signal}: it finished before the signal"
        );
        let err = stderr(&out);
        let name = format!("interrupted by SIG{}", &signal[1..]);
        assert!(err.contains(&name), "{signal}: {err}");
        assert!(
            err.contains("everything this run created was removed"),
            "{signal}: {err}"
        );
        assert_eq!(
            fx.resources("us-east-1", &id),
            (vec![], vec![]),
            "{signal}: {err}"
        );
        let list = fx.json(&["publish", "list", "--json"]);
        assert_eq!(list.as_array().unwrap().len(), 0, "{signal}: {list}");
    }
    // And a run left alone finishes.
    ok(&fx.run(&["publish", "ami", &reference, "--region", "us-east-1"]));
    let (images, snaps) = fx.resources("us-east-1", &id);
    assert_eq!((images.len(), snaps.len()), (1, 1));
}

#[test]
fn failed_boot_test_force_and_configuration_errors() {
    let fx = Fixture::new();
    let version = "0.4.0+dddddddddddd";
    fx.version(version, 8, &[0], Some(false));
    let reference = format!("devos-pub@{version}");

    let out = fx.run(&["publish", "ami", &reference, "--region", "us-east-1"]);
    refused(&out, "failed its last boot test");

    // --force publishes, loudly, and says so on the AMI.
    let out = fx.run(&[
        "publish",
        "ami",
        &reference,
        "--region",
        "us-east-1",
        "--force",
        "--json",
    ]);
    ok(&out);
    assert!(
        stderr(&out).contains("WITHOUT a passing boot test"),
        "{}",
        stderr(&out)
    );
    let ami = json(&out)["regions"][0]["ami_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        fx.ami_tags("us-east-1", &ami)["devos:boot-test"],
        "skipped-with-force"
    );

    // No credentials anywhere in the chain.
    let mut c = fx.cmd(&[
        "publish",
        "ami",
        &reference,
        "--region",
        "us-east-1",
        "--force",
    ]);
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    let out = run(&mut c, 2);
    refused(&out, "no AWS credentials found");
    assert!(
        stderr(&out).contains("hint: set AWS_ACCESS_KEY_ID"),
        "{}",
        stderr(&out)
    );

    // No region.
    let out = fx.run(&["publish", "ami", &reference, "--force"]);
    refused(&out, "no AWS region is set");

    // A bad settings file names the file, line and key.
    let settings = fx.dir.path().join("bad.toml");
    std::fs::write(&settings, "[aws]\nendpoint-url = \"localhost:5000\"\n").unwrap();
    let out = fx.run(&["--config", settings.to_str().unwrap(), "publish", "list"]);
    refused(&out, "bad.toml:2:16: endpoint-url");

    // Promotion passes the same gate, --force or not.
    let out = fx.run(&["publish", "promote", &reference]);
    refused(&out, "failed its last boot test");

    // Not published: promote says what to run.
    fx.version("0.4.1+dddddddddddd", 8, &[0], Some(true));
    let out = fx.run(&[
        "publish",
        "promote",
        "devos-pub@0.4.1+dddddddddddd",
        "--region",
        "eu-west-1",
    ]);
    refused(&out, "is not published in eu-west-1");
}

/// A Secure Boot image's AMI carries its keys (UEFI data made from the certificate the
/// manifest records, checked against the recorded hash); a version whose manifest
/// lacks the certificate, or holds another one, is refused before anything is
/// uploaded. (moto keeps no UEFI data: what RegisterImage is sent is checked in
/// devos-aws's unit tests, the data itself in image/secure_boot.rs's.)
#[test]
fn secure_boot_images_are_published_with_their_keys_or_not_at_all() {
    let fx = Fixture::new();
    let keys = tempfile::tempdir().unwrap();
    let (key, crt, der) = (
        keys.path().join("k.pem"),
        keys.path().join("c.pem"),
        keys.path().join("c.der"),
    );
    let made = Command::new("openssl")
        .args(["req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes"])
        .args(["-subj", "/CN=DevOS publish test/", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .unwrap();
    ok(&made);
    ok(&Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&crt)
        .arg("-out")
        .arg(&der)
        .output()
        .unwrap());
    let pem = std::fs::read_to_string(&crt).unwrap();
    let sha256 = devos_build::support::digest::file_sha256(&der).unwrap();
    let signed = |version: &str, certificate: &str, sha256: &str| {
        fx.version_with(
            version,
            8,
            &[0],
            Some(true),
            json!({"secure_boot": {
                "certificate_sha256": sha256,
                "subject": "CN = DevOS publish test",
                "certificate": certificate,
            }}),
        );
        format!("devos-pub@{version}")
    };
    let id = |version: &str| format!("{:0>64}", version.replace(['.', '+'], ""));
    // `publish ami REFERENCE --region us-east-1 EXTRA...`.
    let publish = |reference: &str, extra: &[&str]| {
        let mut args = vec!["publish", "ami", reference, "--region", "us-east-1"];
        args.extend_from_slice(extra);
        fx.cmd(&args)
    };

    // Built before the certificate was recorded: refused, by the dry run too, nothing
    // made.
    let old = "0.7.0+aaaaaaaaaaaa";
    let old_ref = signed(old, "", &sha256);
    let why = "does not hold the certificate its AMI must be given";
    refused(&run(&mut publish(&old_ref, &["--dry-run"]), 5), why);
    let out = run(&mut publish(&old_ref, &[]), 5);
    refused(&out, why);
    assert!(
        stderr(&out).contains("build the version again"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fx.resources("us-east-1", &id(old)), (vec![], vec![]));

    // A certificate that is not the one the image was signed with: refused.
    let other = "0.7.1+aaaaaaaaaaaa";
    let out = run(&mut publish(&signed(other, &pem, &"0".repeat(64)), &[]), 5);
    refused(&out, "not the 0000");
    assert_eq!(fx.resources("us-east-1", &id(other)), (vec![], vec![]));

    // The right one: the dry run says the AMI gets the keys, the run publishes it.
    let good = "0.7.2+aaaaaaaaaaaa";
    let reference = signed(good, &pem, &sha256);
    let dry = run(&mut publish(&reference, &["--dry-run"]), 5);
    ok(&dry);
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.contains(&format!(
            "Secure Boot certificate CN = DevOS publish test (sha256 {sha256})"
        )),
        "{plan}"
    );
    ok(&run(&mut publish(&reference, &["--json"]), 5));
    assert_eq!(fx.resources("us-east-1", &id(good)).0.len(), 1);
    // Copying it to another region needs no UEFI data (the copy takes the AMI's): it
    // works where uefivars is not installed.
    let mut copy = publish(&reference, &["--copy-to", "eu-west-1"]);
    ok(&run(copy.env("PATH", "/usr/bin:/bin"), 5));
    assert_eq!(fx.resources("eu-west-1", &id(good)).0.len(), 1);
    // `image show` says what the version is signed with.
    let shown = fx.run(&["image", "show", &reference]);
    ok(&shown);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(&format!(
            "secure boot   signed by CN = DevOS publish test (certificate sha256 {sha256})"
        )),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
}

#[test]
fn rejected_credentials_and_denied_access_say_what_to_fix() {
    // moto checks credentials and IAM policies once its first 2 requests are done:
    // those create a user without any policy and an access key for it.
    let moto = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "2")]).unwrap();
    let key = devos_tests::python_command("python")
        .arg("-c")
        .arg(
            "import boto3, sys\n\
             iam = boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                                aws_access_key_id='x', aws_secret_access_key='x')\n\
             iam.create_user(UserName='nobody')\n\
             k = iam.create_access_key(UserName='nobody')['AccessKey']\n\
             print(k['AccessKeyId'], k['SecretAccessKey'])",
        )
        .arg(moto.endpoint())
        .output()
        .unwrap();
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
    let key = String::from_utf8(key.stdout).unwrap();
    let (id, secret) = key.trim().split_once(' ').unwrap();

    let mut fx = Fixture::new();
    fx.moto = moto;
    fx.version("0.7.0+777777777777", 8, &[0], Some(true));
    let publish = |id: &str, secret: &str| {
        let mut c = fx.cmd(&[
            "publish",
            "ami",
            "devos-pub@0.7.0+777777777777",
            "--region",
            "eu-west-1",
        ]);
        c.env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", secret);
        run(&mut c, 2)
    };
    let out = publish("AKIAUNKNOWN000000000", "nope");
    refused(&out, "AWS rejected the credentials");
    let out = publish(id, secret);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ec2:DescribeImages in eu-west-1 failed")
            && stderr(&out).contains("hint: the credentials in use need the IAM permission ec2:DescribeImages in eu-west-1"),
        "{}",
        stderr(&out)
    );
}

/// `packer render REFERENCE` for us-east-1 into `dir`.
fn packer_render<'a>(reference: &'a str, dir: &'a Path) -> Vec<&'a str> {
    vec![
        "packer",
        "render",
        reference,
        "--region",
        "us-east-1",
        "--out",
        dir.to_str().unwrap(),
    ]
}

#[test]
fn packer_templates_validate_and_build_against_the_endpoint() {
    require("packer", "packer");
    let fx = Fixture::new();
    let version = "0.5.0+eeeeeeeeeeee";
    fx.version(version, 8, &[0], Some(true));
    let reference = format!("devos-pub@{version}");
    // An endpoint Packer would misread is refused, naming where it came from.
    for (url, says) in [
        ("http://127.0.0.1:1/{{.Vars}}", "holds `{{` or `}}`"),
        (
            "http://h/a\tb",
            "AWS_ENDPOINT_URL_EC2=`http://h/a\tb` is not an http(s) URL",
        ),
    ] {
        let out = run(
            fx.cmd(&["packer", "render", &reference, "--region", "us-east-1"])
                .env("AWS_ENDPOINT_URL_EC2", url),
            5,
        );
        assert!(!out.status.success());
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
    // A NixOS build has its agent inside the image, no package for Packer to install:
    // said so, with the command that publishes it.
    let nixos = "0.5.1+ffffffffffff";
    fx.version_with(
        nixos,
        8,
        &[0],
        Some(true),
        json!({"distro": "nixos", "agent": {"file": "", "version": "0.1.0", "sha256": "", "models": ["m"]}}),
    );
    let out = run(
        &mut fx.cmd(&[
            "packer",
            "render",
            &format!("devos-pub@{nixos}"),
            "--region",
            "us-east-1",
        ]),
        5,
    );
    refused(&out, "is a NixOS build");
    refused(
        &out,
        "hint: publish this version with `devos-build publish ami`",
    );
    for variant in [&[][..], &["--no-communicator"][..]] {
        let out_dir = fx.dir.path().join(format!("packer{}", variant.len()));
        let mut args = packer_render(&reference, &out_dir);
        args.push("--json");
        args.extend_from_slice(variant);
        let r = fx.json(&args);
        assert_eq!(r["validated"], true);
        let hcl = std::fs::read_to_string(out_dir.join("devos.pkr.hcl")).unwrap();
        let tag = format!("\"devos:version\" = \"{version}\"");
        assert!(
            hcl.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == tag),
            "{hcl}"
        );
        // Laid out as `packer fmt` would: a user's `packer fmt -check` passes.
        let fmt = Command::new("packer")
            .args(["fmt", "-check", "devos.pkr.hcl"])
            .current_dir(&out_dir)
            .env("CHECKPOINT_DISABLE", "1")
            .output()
            .unwrap();
        ok(&fmt);
        assert_eq!(
            hcl.contains("provisioner \"shell\""),
            variant.is_empty(),
            "{hcl}"
        );
        // Where SSH may come from is the user's to narrow.
        assert_eq!(
            hcl.contains("temporary_security_group_source_cidrs = var.ssh_source_cidrs"),
            variant.is_empty(),
            "{hcl}"
        );
        for f in ["devos-agent.deb", "agent.toml", "provision.sh"] {
            assert!(out_dir.join(f).is_file(), "{f}");
        }
    }
    // Rendered again over the earlier render; never over a user's file of a rendered
    // name, which is left as it was.
    let render_into = |dir: &Path| fx.run(&packer_render(&reference, dir));
    ok(&render_into(&fx.dir.path().join("packer0")));
    let theirs = fx.dir.path().join("their-packer");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("provision.sh"), "#!/bin/sh\necho mine\n").unwrap();
    refused(&render_into(&theirs), "but no template it rendered");
    assert_eq!(
        std::fs::read_to_string(theirs.join("provision.sh")).unwrap(),
        "#!/bin/sh\necho mine\n"
    );
    assert!(!theirs.join("devos.pkr.hcl").exists());
    // A real `packer build` against moto_server, from one of the base AMIs it ships.
    let publish = [
        "publish",
        "packer",
        &reference,
        "--region",
        "us-east-1",
        "--no-communicator",
        "--json",
    ];
    let mut first = publish.to_vec();
    first.extend([
        "--var",
        "base_ami_name=ubuntu/images/hvm-ssd/ubuntu-xenial-16.04-amd64-server-*",
    ]);
    let out = run(&mut fx.cmd(&first), 10);
    ok(&out);
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ami = built["ami_id"].as_str().unwrap();
    assert!(
        Path::new(built["dir"].as_str().unwrap())
            .join("devos.pkr.hcl")
            .is_file(),
        "{built}"
    );
    let (images, _) = fx.resources("us-east-1", &build_id(version));
    assert_eq!(images, [ami]);
    // Published again: the AMI the registry has, nothing rendered or built.
    let again = fx.json(&publish);
    assert_eq!(again["ami_id"], ami, "{again}");
    assert!(again["dir"].is_null(), "{again}");
    assert_eq!(fx.resources("us-east-1", &build_id(version)).0, [ami]);
    // Tagged like a direct upload: what was tested and from which spec.
    let tags = fx.ami_tags("us-east-1", ami);
    assert_eq!(tags["devos:boot-test"], "passed", "{tags:?}");
    assert!(
        tags["devos:spec"].ends_with("images/devos-pub.toml"),
        "{tags:?}"
    );
    let list = fx.json(&["publish", "list", "--json"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "packer-bare" && p["ami_id"] == ami),
        "{list}"
    );
    // Nothing was provisioned on it: no fleet may run it.
    refused(
        &fx.run(&[
            "fleet",
            "render",
            "instance",
            "--image",
            &reference,
            "--region",
            "us-east-1",
        ]),
        "is not published in us-east-1",
    );
    // The direct upload of the same version makes its own AMI: Packer's (an Ubuntu
    // base with the agent) is not taken for it.
    let direct = fx.json(&[
        "publish",
        "ami",
        &reference,
        "--region",
        "us-east-1",
        "--json",
    ]);
    let direct = direct["regions"][0]["ami_id"].as_str().unwrap().to_owned();
    assert_ne!(direct, ami);
    let (mut images, _) = fx.resources("us-east-1", &build_id(version));
    images.sort();
    let mut both = vec![ami.to_owned(), direct];
    both.sort();
    assert_eq!(images, both);
}

#[test]
fn cloudformation_templates_render_for_published_versions_and_pass_cfn_lint() {
    let fx = Fixture::new();
    let version = "0.9.0+999999999999";
    // The agent's models as a build records them: its role may invoke those only.
    let haiku = devos_agent::config::HAIKU_4_5;
    let agent = json!({"file": "devos-agent_0.1.0_amd64.deb", "version": "0.1.0", "sha256": "0",
        "models": [haiku]});
    fx.version_with(version, 8, &[0], Some(true), json!({ "agent": agent }));
    let reference = format!("devos-pub@{version}");
    let render = |template: &str, region: &str| {
        fx.run(&[
            "fleet", "render", template, "--image", &reference, "--region", region,
        ])
    };
    // Not published yet: refused, with the command that fixes it.
    let out = render("fleet", "us-east-1");
    refused(&out, "is not published in us-east-1");
    ok(&fx.run(&["publish", "ami", &reference, "--region", "us-east-1"]));
    let ami = fx.resources("us-east-1", &build_id(version)).0.remove(0);

    for template in ["instance", "fleet", "workspaces"] {
        let out = render(template, "us-east-1");
        ok(&out);
        assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
        let yaml = String::from_utf8(out.stdout).unwrap();
        if template != "workspaces" {
            assert!(yaml.contains(&format!("Default: {ami}")), "{yaml}");
            assert!(yaml.contains("HttpTokens: required"), "{yaml}");
            assert!(
                yaml.contains(&format!("inference-profile/{haiku}\"")),
                "{yaml}"
            );
            assert!(!yaml.contains("foundation-model/*"), "{yaml}");
        } else {
            // It names no region, so it needs none.
            let out = run(
                fx.cmd(&["fleet", "render", template, "--image", &reference])
                    .env_remove("AWS_REGION")
                    .env_remove("AWS_DEFAULT_REGION"),
                5,
            );
            ok(&out);
            assert_eq!(String::from_utf8(out.stdout).unwrap(), yaml);
        }
        let file = fx.dir.path().join(format!("{template}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        let checked = devos_tests::python_command("cfn-lint")
            .args(["--regions", "us-east-1", "--"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            checked.status.success(),
            "cfn-lint rejects the {template} template:\n{}{}\n{yaml}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
    }
    let fleet = String::from_utf8(render("fleet", "us-east-1").stdout).unwrap();
    for needle in [
        "AutoScalingRollingUpdate:",
        "WaitOnResourceSignals: true",
        "CreationPolicy:",
        "LatestVersionNumber",
    ] {
        assert!(fleet.contains(needle), "{needle}");
    }
    // Its agent calls a US inference profile in the instance's region: in eu-west-1
    // every model call would be refused, and rendering says so.
    ok(&fx.run(&["publish", "ami", &reference, "--region", "eu-west-1"]));
    let out = render("instance", "eu-west-1");
    ok(&out);
    assert!(
        stderr(&out).contains(&format!("warning: {reference}'s agent calls Bedrock in the instance's region: `{haiku}` is a US cross-region inference profile"))
            && stderr(&out).contains("hint: name the model's profile for eu-west-1's geography"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn exports_are_checked_with_qemu_img_and_recorded() {
    require("qemu-img", "qemu-utils");
    let fx = Fixture::new();
    let version = "0.6.0+ffffffffffff";
    let raw = fx.version(version, 16, &[0, 5, 31], Some(true));
    let reference = format!("devos-pub@{version}");
    for (format, qemu_format) in [("vmdk", "vmdk"), ("vhd", "vpc"), ("qcow2", "qcow2")] {
        let e = fx.json(&["image", "export", &reference, "--format", format, "--json"]);
        let path = PathBuf::from(e["path"].as_str().unwrap());
        assert_eq!(
            e["sha256"],
            devos_build::support::digest::file_sha256(&path).unwrap()
        );
        // A fixed VHD has no header to probe: name the format.
        let info = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", qemu_format])
            .arg(&path)
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], qemu_format, "{info}");
        assert_eq!(info["virtual-size"], 16 * MIB, "{info}");
        if format == "vmdk" {
            assert_eq!(
                info["format-specific"]["data"]["create-type"], "streamOptimized",
                "{info}"
            );
        }
        if format == "vhd" {
            // Fixed VHD: the raw bytes, then a 512-byte footer.
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB + 512);
        }
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", qemu_format])
            .arg(&raw)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "{}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
    let show = fx.json(&["image", "show", &reference, "--json"]);
    let formats: Vec<&str> = show["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["format"].as_str().unwrap())
        .collect();
    for f in ["raw", "vmdk", "vhd", "qcow2"] {
        assert!(formats.contains(&f), "{show}");
    }
    // Again: nothing converted, the recorded one is reported.
    let e = fx.json(&["image", "export", &reference, "--format", "vhd", "--json"]);
    assert_eq!(e["converted"], false);
    // An --out that cannot be written is said before anything converts, with what to do.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/x.vmdk");
    let here = dir.path().to_str().unwrap();
    // Nor over a device or FIFO (it would become a file holding the image), nor over
    // the version's own files.
    let fifo = dir.path().join("pipe");
    devos_tests::mkfifo(&fifo);
    let own = raw.with_extension("vmdk");
    for (out, said) in [
        (missing.to_str().unwrap(), "there is no directory"),
        (here, "is a directory"),
        (fifo.to_str().unwrap(), "is not a regular file"),
        ("/dev/null", "is not a regular file"),
        (
            raw.to_str().unwrap(),
            "the output directory of a registered version",
        ),
        (
            own.to_str().unwrap(),
            "the output directory of a registered version",
        ),
    ] {
        for dry in [&[][..], &["--dry-run"]] {
            let mut args = vec![
                "image", "export", &reference, "--format", "vmdk", "--out", out,
            ];
            args.extend_from_slice(dry);
            let o = fx.run(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert!(
                err.contains(said) && err.contains("hint:") && !err.contains("qemu-img"),
                "{args:?}: {err}"
            );
        }
    }
    // A raw image that changed since its build is not exported.
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff], 5 * BLOCK + 3).unwrap();
    drop(f);
    let out_file = dir.path().join("changed.qcow2");
    let o = fx.run(&[
        "image",
        "export",
        &reference,
        "--format",
        "qcow2",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    refused(&o, "changed since it was built");
    assert!(!out_file.exists());
}

#[test]
fn fleets_deploy_roll_out_through_a_canary_roll_back_on_a_failed_gate_and_by_hand() {
    let steps = Steps::default();
    steps.at("set up");
    let fx = Fixture::new();
    let mut amis = std::collections::HashMap::new();
    let model = |version: &str| format!("anthropic.model-{}-v1:0", &version[..1]);
    for version in ["1.0.0", "2.0.0", "3.0.0", "4.0.0"] {
        // Each version's agent calls a model of its own (v4 is a build from before the
        // models were recorded).
        let calls = match version {
            "4.0.0" => json!({}),
            v => json!({"agent": {"file": "devos-agent_0.1.0_amd64.deb", "version": "0.1.0",
                "sha256": "0", "models": [model(v)]}}),
        };
        fx.version_with(version, 8, &[0], Some(true), calls);
        if version != "4.0.0" {
            ok(&fx.run(&[
                "publish",
                "ami",
                &format!("devos-pub@{version}"),
                "--region",
                "us-east-1",
            ]));
            amis.insert(
                version,
                fx.resources("us-east-1", &build_id(version)).0.remove(0),
            );
        }
    }
    let fleet = |args: &[&str]| fx.fleet_in_region(args);

    // Deploy v1 to the fleet and to its canary: the default VPC's subnets are used.
    steps.at("Deploy v1 to the fleet and to its canary");
    fx.block_on(
        fx.ec2("us-east-1")
            .create_key_pair()
            .key_name("devos-canary")
            .send(),
    )
    .unwrap();
    // A root volume smaller than the image's disk (1 GiB) is refused before anything
    // is made: EC2 would refuse every launch.
    for (size, why) in [
        (
            "0",
            "EC2 launches no smaller volume from it\n  hint: pass `--param VolumeSize=N` with N from 1",
        ),
        ("lots", "expected a whole number of GiB from 1"),
        ("08", "expected a whole number of GiB from 1"),
    ] {
        let size = format!("VolumeSize={size}");
        refused(
            &fleet(&[
                "deploy",
                "--stack",
                "devfleet",
                "--template",
                "fleet",
                "--image",
                "devos-pub@1.0.0",
                "--param",
                &size,
            ]),
            why,
        );
    }
    // The canary's instances get a key pair (their default user's SSH key) and a root
    // volume larger than the image (its /var takes the rest at boot).
    for (stack, capacity, ssh) in [
        ("devfleet", "2", &[][..]),
        (
            "devfleet-canary",
            "1",
            &["--param", "KeyName=devos-canary", "--param", "VolumeSize=3"][..],
        ),
    ] {
        let capacity = format!("DesiredCapacity={capacity}");
        let mut args = vec![
            "deploy",
            "--stack",
            stack,
            "--template",
            "fleet",
            "--image",
            "devos-pub@1.0.0",
            "--param",
            &capacity,
            "--bake",
            "0",
            "--json",
        ];
        args.extend_from_slice(ssh);
        let out = fleet(&args);
        ok(&out);
        let d = json(&out);
        assert_eq!(d["state"], "succeeded", "{d}");
        assert!(
            d["parameters"]["Subnets"][1]
                .as_str()
                .unwrap()
                .starts_with("subnet-"),
            "{d}"
        );
    }
    let (lt, instances) = fx.fleet("devfleet");
    assert_eq!(lt, amis["1.0.0"]);
    assert_eq!(instances, vec![amis["1.0.0"].clone(); 2]);
    assert_eq!(fx.role_models("devfleet"), [model("1")]);
    // The instances' root volumes are encrypted: the AMI's root device, its size.
    assert_eq!(
        fx.root_volume("devfleet"),
        ("/dev/xvda".to_owned(), true, 1)
    );
    assert_eq!(
        fx.root_volume("devfleet-canary"),
        ("/dev/xvda".to_owned(), true, 3)
    );
    assert_eq!(fx.ssh_access("devfleet"), (None, Vec::new()));
    assert_eq!(
        fx.ssh_access("devfleet-canary"),
        (Some("devos-canary".to_owned()), Vec::new())
    );

    // A dry run of a new stack lists what it would create, and creates nothing.
    steps.at("A dry run of a new stack lists what it would create, and creates...");
    let out = fleet(&[
        "deploy",
        "--stack",
        "preview",
        "--template",
        "fleet",
        "--image",
        "devos-pub@1.0.0",
        "--dry-run",
        "--json",
    ]);
    ok(&out);
    let d = json(&out);
    assert_eq!(d["state"], "dry-run", "{d}");
    let types: Vec<&str> = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["resource_type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"AWS::AutoScaling::AutoScalingGroup")
            && types.contains(&"AWS::EC2::LaunchTemplate"),
        "{d}"
    );
    let out = fleet(&["status", "--stack", "preview"]);
    assert!(
        !out.status.success() && stderr(&out).contains("there is no stack preview"),
        "{}",
        stderr(&out)
    );

    // One developer instance from the instance template.
    steps.at("One developer instance from the instance template");
    let out = fleet(&[
        "deploy",
        "--stack",
        "devbox",
        "--template",
        "instance",
        "--image",
        "devos-pub@1.0.0",
        "--bake",
        "0",
        "--json",
    ]);
    ok(&out);
    assert_eq!(json(&out)["state"], "succeeded");
    assert_eq!(fx.instance_image("devbox"), amis["1.0.0"]);
    assert_eq!(fx.ssh_access("devbox"), (None, Vec::new()));
    // With a key pair and an address range it is reachable over SSH.
    let out = fleet(&[
        "deploy",
        "--stack",
        "devbox-ssh",
        "--template",
        "instance",
        "--image",
        "devos-pub@1.0.0",
        "--param",
        "KeyName=devos-canary",
        "--param",
        "SshCidr=203.0.113.0/24",
        "--bake",
        "0",
        "--json",
    ]);
    ok(&out);
    assert_eq!(
        fx.ssh_access("devbox-ssh"),
        (
            Some("devos-canary".to_owned()),
            vec!["203.0.113.0/24".to_owned()]
        )
    );

    // Mistakes are named, and change nothing.
    steps.at("Mistakes are named, and change nothing");
    for (args, says) in [
        (
            vec![
                "deploy",
                "--stack",
                "x",
                "--template",
                "fleet",
                "--image",
                "devos-pub@1.0.0",
                "--param",
                "Bogus=1",
            ],
            "--param Bogus: the fleet template has no such parameter",
        ),
        (
            vec![
                "deploy",
                "--stack",
                "x",
                "--template",
                "fleet",
                "--image",
                "devos-pub@1.0.0",
                "--param",
                "DesiredCapacity",
            ],
            "`DesiredCapacity` is not KEY=VALUE",
        ),
        (
            vec![
                "deploy",
                "--stack",
                "x",
                "--template",
                "fleet",
                "--image",
                "devos-pub@1.0.0",
                "--param",
                "ImageId=ami-1",
            ],
            "--param ImageId: set by --image",
        ),
        (
            vec!["rollout", "--stack", "nosuch", "--to", "2.0.0"],
            "there is no stack nosuch in us-east-1",
        ),
        (
            vec![
                "deploy",
                "--stack",
                "x",
                "--template",
                "fleet",
                "--image",
                "devos-pub@1.0.0",
                "--param",
                "VpcId=vpc-1",
            ],
            "--param VpcId and --param Subnets go together",
        ),
        (
            vec![
                "deploy",
                "--stack",
                "devbox",
                "--template",
                "fleet",
                "--image",
                "devos-other@1.0.0",
            ],
            "no image `devos-other`",
        ),
    ] {
        let out = fleet(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }

    // A dry run shows the change and changes nothing.
    steps.at("A dry run shows the change and changes nothing");
    let out = fleet(&[
        "rollout",
        "--stack",
        "devfleet",
        "--to",
        "2.0.0",
        "--dry-run",
        "--json",
    ]);
    ok(&out);
    let d = json(&out);
    assert_eq!(d[0]["state"], "dry-run", "{d}");
    assert_eq!(
        d[0]["parameters"]["ImageId"],
        json!([amis["1.0.0"], amis["2.0.0"]]),
        "{d}"
    );
    assert_eq!(fx.fleet("devfleet").0, amis["1.0.0"]);

    // Roll out v2, canary first: both stacks end on v2's AMI, launch template and
    // instances alike.
    steps.at("Roll out v2, canary first");
    let out = fleet(&[
        "rollout",
        "--stack",
        "devfleet",
        "--to",
        "2.0.0",
        "--canary-stack",
        "devfleet-canary",
        "--bake",
        "0",
        "--json",
    ]);
    ok(&out);
    let d = json(&out);
    assert_eq!(d[0]["stack"], "devfleet-canary", "{d}");
    assert_eq!(d[1]["stack"], "devfleet", "{d}");
    assert_eq!(d[1]["state"], "succeeded", "{d}");
    assert!(
        stderr(&out).contains("UPDATE_COMPLETE"),
        "events are streamed: {}",
        stderr(&out)
    );
    for stack in ["devfleet", "devfleet-canary"] {
        let (lt, instances) = fx.fleet(stack);
        assert_eq!(lt, amis["2.0.0"], "{stack}");
        assert!(
            !instances.is_empty() && instances.iter().all(|i| *i == amis["2.0.0"]),
            "{stack}: {instances:?}"
        );
        // v1's instances called their model until they were replaced; once the gate
        // passed, the role allows v2's only.
        assert_eq!(fx.role_models(stack), [model("2")], "{stack}");
    }
    assert!(
        stderr(&out)
            .contains("rollout devfleet: leaving the agents' role only devos-pub@2.0.0's models"),
        "{}",
        stderr(&out)
    );

    // v3 goes bad during the bake: one of its new instances turns unhealthy (what Auto
    // Scaling does when an instance fails its checks). The rollout rolls back to v2
    // by itself and marks v3 bad for the stack.
    steps.at("v3 goes bad during the bake");
    let child = fx
        .cmd(&[
            "fleet",
            "rollout",
            "--stack",
            "devfleet",
            "--to",
            "3.0.0",
            "--bake",
            "60",
            "--json",
            "--region",
            "us-east-1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sick = fx.sicken("devfleet", &amis["3.0.0"]);
    // While v3's instances replace v2's, the role allows both versions' models.
    assert_eq!(fx.role_models("devfleet"), [model("2"), model("3")]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "a failed gate fails the rollout");
    let d = json(&out);
    assert_eq!(d[0]["state"], "rolled-back", "{d}");
    assert!(
        d[0]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("instance {sick} is Unhealthy")),
        "{d}"
    );
    assert_eq!(d[0]["rollback"]["state"], "succeeded", "{d}");
    let (lt, instances) = fx.fleet("devfleet");
    assert_eq!(lt, amis["2.0.0"]);
    assert!(
        !instances.is_empty() && instances.iter().all(|i| *i == amis["2.0.0"]),
        "{instances:?}"
    );
    // Back on v2 alone, the role is v2's again.
    assert_eq!(fx.role_models("devfleet"), [model("2")]);
    let out = fleet(&["rollout", "--stack", "devfleet", "--to", "3.0.0"]);
    refused(&out, "is marked bad for stack devfleet");

    // Never published here: refused before anything changes.
    steps.at("Never published here");
    let out = fleet(&["rollout", "--stack", "devfleet", "--to", "4.0.0"]);
    refused(&out, "is not published in us-east-1");
    assert_eq!(fx.fleet("devfleet").0, amis["2.0.0"]);

    // By hand: back to the last version that passed its gate before v2, which is v1.
    steps.at("By hand");
    let out = fleet(&["rollback", "--stack", "devfleet", "--bake", "0", "--json"]);
    ok(&out);
    let d = json(&out);
    assert_eq!(
        (d["from"].as_str(), d["to"].as_str(), d["state"].as_str()),
        (Some("2.0.0"), Some("1.0.0"), Some("succeeded")),
        "{d}"
    );
    assert!(d["issued_after"].as_f64().unwrap() > 0.0, "{d}");
    let (lt, instances) = fx.fleet("devfleet");
    assert_eq!(lt, amis["1.0.0"]);
    assert!(
        instances.iter().all(|i| *i == amis["1.0.0"]),
        "{instances:?}"
    );

    let status = json(&fleet(&["status", "--stack", "devfleet", "--json"]));
    assert_eq!(status["version"], "devos-pub@1.0.0", "{status}");
    // Each instance with where to reach it (moto gives private addresses at least).
    let instances = status["running"]["instances"].as_array().unwrap();
    assert!(
        !instances.is_empty()
            && instances
                .iter()
                .all(|i| i["address"].as_str().is_some_and(|a| !a.is_empty())),
        "{status}"
    );
    assert_eq!(
        fx.history("devfleet"),
        [
            "rollback 1.0.0 succeeded",
            "auto-rollback 2.0.0 succeeded",
            "rollout 3.0.0 rolled-back",
            "rollout 2.0.0 succeeded",
            "deploy 1.0.0 succeeded",
        ]
    );

    // v3 fails on the canary: the canary goes back, the stack is not touched, and v3
    // is marked bad for the stack too.
    steps.at("A failure on the canary marks the version bad for the stack");
    ok(&fleet(&[
        "unmark",
        "--stack",
        "devfleet",
        "devos-pub@3.0.0",
    ]));
    let child = fx
        .cmd(&[
            "fleet",
            "rollout",
            "--stack",
            "devfleet",
            "--to",
            "3.0.0",
            "--canary-stack",
            "devfleet-canary",
            "--bake",
            "60",
            "--json",
            "--region",
            "us-east-1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    fx.sicken("devfleet-canary", &amis["3.0.0"]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    let d = json(&out);
    assert_eq!(d.as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d[0]["stack"], "devfleet-canary", "{d}");
    assert_eq!(d[0]["state"], "rolled-back", "{d}");
    assert_eq!(fx.fleet("devfleet-canary").0, amis["2.0.0"]);
    assert_eq!(fx.fleet("devfleet").0, amis["1.0.0"]);
    assert_eq!(fx.history("devfleet")[0], "rollback 1.0.0 succeeded");
    let out = fleet(&[
        "unmark",
        "--stack",
        "devfleet",
        "devos-pub@3.0.0",
        "--dry-run",
        "--json",
    ]);
    ok(&out);
    assert!(
        json(&out)["reason"]
            .as_str()
            .unwrap()
            .contains("failed on canary stack devfleet-canary"),
        "{}",
        json(&out)
    );
    refused(
        &fleet(&["rollout", "--stack", "devfleet", "--to", "3.0.0"]),
        "is marked bad for stack devfleet",
    );
}

/// Replacement rollouts that do not end as planned: stopped during the bake (by a
/// signal, or killed outright) and run again (the version the stack runs is judged,
/// not taken for done), a deploy of new parameters alone whose gate fails (nothing is
/// marked bad), a manual rollback whose gate fails (it stays, it does not go forward
/// again), a failed rollout from a version marked bad (it does not go back there), a
/// mark taken back (not by a dry run), the refusals that must come before anything
/// moves (a version marked bad, one that failed its boot test on every path), and what
/// `publish deregister` keeps.
#[test]
fn interrupted_rollouts_are_judged_when_run_again_and_failed_rollbacks_stay() {
    let steps = Steps::default();
    steps.at("set up");
    let fx = Fixture::new();
    let mut amis = std::collections::HashMap::new();
    let model = |version: &str| format!("anthropic.model-{}-v1:0", &version[..1]);
    for version in ["1.0.0", "2.0.0", "3.0.0", "4.0.0"] {
        // Each version's agent calls a model of its own (v4 is a build from before the
        // models were recorded).
        let calls = match version {
            "4.0.0" => json!({}),
            v => json!({"agent": {"file": "devos-agent_0.1.0_amd64.deb", "version": "0.1.0",
                "sha256": "0", "models": [model(v)]}}),
        };
        fx.version_with(version, 8, &[0], Some(true), calls);
        ok(&fx.run(&[
            "publish",
            "ami",
            &format!("devos-pub@{version}"),
            "--region",
            "us-east-1",
        ]));
        amis.insert(
            version,
            fx.resources("us-east-1", &build_id(version)).0.remove(0),
        );
    }
    let fleet = |args: &[&str]| fx.fleet_in_region(args);
    ok(&fleet(&[
        "deploy",
        "--stack",
        "devfleet",
        "--template",
        "fleet",
        "--image",
        "devos-pub@1.0.0",
        "--param",
        "DesiredCapacity=2",
        "--bake",
        "0",
    ]));
    let sicken = |ami: &str| {
        fx.sicken("devfleet", ami);
    };
    let spawn = |args: &[&str]| {
        let mut all = vec!["fleet"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--region", "us-east-1"]);
        fx.cmd(&all)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The command `args`, stopped by `signal` once instances on `ami` are up (in its
    // bake, or about to be): its output.
    let stopped = |args: &[&str], ami: &str, signal: &str| {
        let child = spawn(args);
        assert!(
            wait_for(Duration::from_secs(45), || !fx
                .instances_on("devfleet", ami)
                .is_empty()),
            "{args:?}: no instance on {ami} appeared"
        );
        std::thread::sleep(Duration::from_secs(2));
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        child.wait_with_output().unwrap()
    };

    steps.at("Refused before anything moves");
    let out = fleet(&[
        "deploy",
        "--stack",
        "devfleet",
        "--template",
        "instance",
        "--image",
        "devos-pub@1.0.0",
    ]);
    refused(
        &out,
        "stack devfleet was made from the fleet template, not instance",
    );
    // A main stack that does not exist is said before the canary changes.
    let out = fleet(&[
        "rollout",
        "--stack",
        "nosuch",
        "--canary-stack",
        "devfleet",
        "--to",
        "2.0.0",
        "--bake",
        "0",
    ]);
    refused(&out, "there is no stack nosuch in us-east-1");
    assert_eq!(fx.fleet("devfleet").0, amis["1.0.0"]);
    assert_eq!(fx.history("devfleet"), ["deploy 1.0.0 succeeded"]);

    // A version whose last boot test failed, published with --force, goes onto no
    // stack and into no template, Packer build or feed, whichever way it is asked for.
    steps.at("The boot-test gate on every path, not only publish ami");
    fx.version("9.0.0", 8, &[0], Some(false));
    ok(&fx.run(&[
        "publish",
        "ami",
        "devos-pub@9.0.0",
        "--region",
        "us-east-1",
        "--force",
    ]));
    let feed = fx.dir.path().join("feed");
    let feed = feed.to_str().unwrap();
    // The feed's path also needs a version machines could take from a feed (with
    // `[update]`, trusting this builder's key): one without is refused for that first.
    let fingerprint = fx.builder_key();
    fx.updatable_version_tested("9.0.1", &fingerprint, Some(false));
    let paths: [&[&str]; 8] = [
        &[
            "fleet",
            "deploy",
            "--stack",
            "devfleet",
            "--template",
            "fleet",
            "--image",
            "devos-pub@9.0.0",
            "--bake",
            "0",
        ],
        &[
            "fleet", "rollout", "--stack", "devfleet", "--to", "9.0.0", "--bake", "0",
        ],
        &[
            "fleet",
            "rollout",
            "--stack",
            "devfleet",
            "--to",
            "devos-pub@9.0.0",
            "--bake",
            "0",
        ],
        &[
            "fleet", "rollback", "--stack", "devfleet", "--to", "9.0.0", "--bake", "0",
        ],
        &[
            "fleet",
            "rollout",
            "--stack",
            "devfleet",
            "--to",
            "9.0.0",
            "--in-place",
            "--bake",
            "0",
        ],
        &["fleet", "render", "fleet", "--image", "devos-pub@9.0.0"],
        &["publish", "packer", "devos-pub@9.0.0", "--dry-run"],
        &["publish", "updates", "devos-pub@9.0.1", "--to", feed],
    ];
    // Every path is tried before any is judged: the message names each that let it by.
    let let_by: Vec<String> = paths
        .iter()
        .filter_map(|args| {
            // The version named (a stack's `--to 9.0.0` is devos-pub's).
            let reference = args
                .iter()
                .find(|a| a.starts_with("devos-pub@"))
                .unwrap_or(&"devos-pub@9.0.0");
            let mut all = args.to_vec();
            all.extend_from_slice(&["--region", "us-east-1"]);
            let out = fx.run(&all);
            let err = stderr(&out);
            let gated = format!("{reference} failed its last boot test");
            (out.status.success() || !err.contains(&gated)).then(|| format!("{args:?}: {err}"))
        })
        .collect();
    assert!(let_by.is_empty(), "{let_by:#?}");
    assert_eq!(fx.fleet("devfleet").0, amis["1.0.0"]);
    assert_eq!(fx.history("devfleet"), ["deploy 1.0.0 succeeded"]);
    assert!(!Path::new(feed).exists());

    steps.at("A rollout stopped during its bake is recorded as interrupted");
    let out = stopped(
        &[
            "rollout", "--stack", "devfleet", "--to", "2.0.0", "--bake", "600",
        ],
        &amis["2.0.0"],
        "-INT",
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted by SIGINT")
            && stderr(&out).contains("run the same command again"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fx.history("devfleet")[0], "rollout 2.0.0 interrupted");

    steps.at("Run again, it judges what the stack runs: the gate fails, it goes back");
    sicken(&amis["2.0.0"]);
    let out = fleet(&[
        "rollout", "--stack", "devfleet", "--to", "2.0.0", "--bake", "5", "--json",
    ]);
    assert!(!out.status.success(), "{}", stderr(&out));
    let d = json(&out);
    assert_eq!(d[0]["state"], "rolled-back", "{d}");
    assert!(
        d[0]["reason"].as_str().unwrap().contains("is Unhealthy"),
        "{d}"
    );
    assert_eq!(d[0]["rollback"]["state"], "succeeded", "{d}");
    assert_eq!(fx.fleet("devfleet").0, amis["1.0.0"]);
    assert_eq!(
        fx.history("devfleet"),
        [
            "auto-rollback 1.0.0 succeeded",
            "rollout 2.0.0 rolled-back",
            "deploy 1.0.0 succeeded",
        ]
    );

    // Deployed to the stack by name it is refused as a rollout is.
    steps.at("A deploy to the stack refuses the version marked bad there");
    let deploy_v2 = [
        "deploy",
        "--stack",
        "devfleet",
        "--template",
        "fleet",
        "--image",
        "devos-pub@2.0.0",
        "--bake",
        "0",
    ];
    refused(&fleet(&deploy_v2), "is marked bad for stack devfleet");
    assert_eq!(fx.fleet("devfleet").0, amis["1.0.0"]);

    steps.at("A dry run of unmark takes nothing back");
    let out = fleet(&[
        "unmark",
        "--stack",
        "devfleet",
        "devos-pub@2.0.0",
        "--dry-run",
        "--json",
    ]);
    ok(&out);
    assert_eq!(json(&out)["dry_run"], true, "{}", json(&out));
    refused(&fleet(&deploy_v2), "is marked bad for stack devfleet");

    steps.at("A mark taken back");
    let out = fleet(&["unmark", "--stack", "devfleet", "devos-pub@2.0.0", "--json"]);
    ok(&out);
    assert!(
        json(&out)["reason"]
            .as_str()
            .unwrap()
            .contains("is Unhealthy"),
        "{}",
        json(&out)
    );
    refused(
        &fleet(&["unmark", "--stack", "devfleet", "devos-pub@2.0.0"]),
        "devos-pub@2.0.0 is not marked bad for stack devfleet in us-east-1",
    );
    ok(&fleet(&[
        "rollout", "--stack", "devfleet", "--to", "2.0.0", "--bake", "0",
    ]));
    assert_eq!(fx.fleet("devfleet").0, amis["2.0.0"]);

    // Killed outright (nothing of it could record that it ended): the next run takes
    // the change it left in progress for interrupted, and judges it.
    steps.at("A rollout killed with SIGKILL is judged when run again, not taken for done");
    let out = stopped(
        &[
            "rollout", "--stack", "devfleet", "--to", "4.0.0", "--bake", "600",
        ],
        &amis["4.0.0"],
        "-KILL",
    );
    assert!(!out.status.success());
    assert_eq!(fx.history("devfleet")[0], "rollout 4.0.0 in-progress");
    sicken(&amis["4.0.0"]);
    let out = fleet(&[
        "rollout", "--stack", "devfleet", "--to", "4.0.0", "--bake", "5", "--json",
    ]);
    assert!(!out.status.success(), "{}", stderr(&out));
    let d = json(&out);
    assert_eq!(d[0]["state"], "rolled-back", "{d}");
    assert_eq!(d[0]["rollback"]["to"], "2.0.0", "{d}");
    assert_eq!(fx.fleet("devfleet").0, amis["2.0.0"]);
    assert_eq!(
        fx.history("devfleet")[..2],
        ["auto-rollback 2.0.0 succeeded", "rollout 4.0.0 rolled-back"]
    );

    // A deploy of the version the stack runs with other parameters, whose gate fails:
    // the parameters go back, and the version is not blamed.
    steps.at("A deploy that changes only parameters marks nothing bad");
    let child = spawn(&[
        "deploy",
        "--stack",
        "devfleet",
        "--template",
        "fleet",
        "--image",
        "devos-pub@2.0.0",
        "--param",
        "DesiredCapacity=3",
        "--bake",
        "60",
        "--json",
    ]);
    assert!(
        wait_for(Duration::from_secs(45), || fx
            .instances_on("devfleet", &amis["2.0.0"])
            .len()
            == 3),
        "the group never grew to 3"
    );
    sicken(&amis["2.0.0"]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    let d = json(&out);
    assert_eq!(d["state"], "rolled-back", "{d}");
    assert_eq!(d["rollback"]["to"], "2.0.0", "{d}");
    refused(
        &fleet(&[
            "unmark",
            "--stack",
            "devfleet",
            "devos-pub@2.0.0",
            "--dry-run",
        ]),
        "devos-pub@2.0.0 is not marked bad for stack devfleet",
    );
    let status = json(&fleet(&["status", "--stack", "devfleet", "--json"]));
    assert_eq!(
        status["stack"]["parameters"]["DesiredCapacity"], "2",
        "{status}"
    );

    // A deploy that changes a parameter too, stopped and judged again: going back puts
    // the parameter back as it was before the change (kept in the registry).
    steps.at("An interrupted deploy with a parameter, judged again, goes back whole");
    let deploy_v3 = |bake: &'static str| {
        vec![
            "deploy",
            "--stack",
            "devfleet",
            "--template",
            "fleet",
            "--image",
            "devos-pub@3.0.0",
            "--param",
            "DesiredCapacity=3",
            "--bake",
            bake,
        ]
    };
    let out = stopped(&deploy_v3("600"), &amis["3.0.0"], "-INT");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(fx.history("devfleet")[0], "deploy 3.0.0 interrupted");
    sicken(&amis["3.0.0"]);
    let mut again = deploy_v3("5");
    again.push("--json");
    let out = fleet(&again);
    assert!(!out.status.success(), "{}", stderr(&out));
    let d = json(&out);
    assert_eq!(d["state"], "rolled-back", "{d}");
    assert_eq!(d["rollback"]["to"], "2.0.0", "{d}");
    let status = json(&fleet(&["status", "--stack", "devfleet", "--json"]));
    assert_eq!(
        status["stack"]["parameters"]["DesiredCapacity"], "2",
        "{status}"
    );
    assert_eq!(fx.fleet("devfleet").0, amis["2.0.0"]);

    steps.at("A rollback stopped during its bake and run again is judged");
    let out = stopped(
        &["rollback", "--stack", "devfleet", "--bake", "600"],
        &amis["1.0.0"],
        "-TERM",
    );
    assert!(
        stderr(&out).contains("interrupted by SIGTERM"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fx.history("devfleet")[0], "rollback 1.0.0 interrupted");

    // Run again (without --to), it judges 1.0.0, which the stack runs: not 2.0.0, the
    // version it was rolled back from. Its gate fails, and it stays where it went.
    steps.at("A rollback whose gate fails stays where it went");
    let child = spawn(&["rollback", "--stack", "devfleet", "--bake", "60", "--json"]);
    sicken(&amis["1.0.0"]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    let d = json(&out);
    assert_eq!(d["state"], "failed", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("a rollback is not undone by going forward again"),
        "{d}"
    );
    assert!(d["rollback"].is_null(), "{d}");
    assert_eq!(fx.fleet("devfleet").0, amis["1.0.0"]);
    assert_eq!(fx.history("devfleet")[0], "rollback 1.0.0 failed");
    refused(
        &fleet(&["rollout", "--stack", "devfleet", "--to", "1.0.0"]),
        "is marked bad for stack devfleet",
    );

    steps.at("Deregister keeps what a stack runs and counts what is gone as done");
    let out = fx.run(&["publish", "deregister", "devos-pub@1.0.0"]);
    refused(
        &out,
        "devos-pub@1.0.0 is what stack devfleet in us-east-1 runs",
    );
    assert_eq!(fx.resources("us-east-1", &build_id("1.0.0")).0.len(), 1);
    let ec2 = fx.ec2("us-east-1");
    fx.block_on(async {
        ec2.deregister_image()
            .image_id(&amis["2.0.0"])
            .send()
            .await
            .unwrap()
    });
    // While a change of a stack it checks is under way, it waits its turn.
    let busy = std::fs::File::create(
        fx.registry()
            .with_file_name("registry.db.fleet-devfleet@us-east-1.lock"),
    )
    .unwrap();
    busy.try_lock().unwrap();
    refused(
        &fx.run(&["publish", "deregister", "devos-pub@2.0.0"]),
        "another devos-build is changing stack devfleet in us-east-1",
    );
    assert_eq!(fx.resources("us-east-1", &build_id("2.0.0")).1.len(), 1);
    // A dry run takes no lock: it answers meanwhile.
    ok(&fx.run(&["publish", "deregister", "devos-pub@2.0.0", "--dry-run"]));
    drop(busy);
    ok(&fx.run(&["publish", "deregister", "devos-pub@2.0.0"]));
    assert_eq!(
        fx.resources("us-east-1", &build_id("2.0.0")),
        (vec![], vec![])
    );
    let list = fx.json(&["publish", "list", "--json"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["version"] == "2.0.0" && p["state"] == "deregistered"),
        "{list}"
    );

    // 1.0.0, which the stack runs, is bad for it now: a failed rollout from it stays
    // where it went rather than go back there.
    steps.at("An automatic rollback never goes back to a version marked bad");
    ok(&fleet(&[
        "unmark",
        "--stack",
        "devfleet",
        "devos-pub@3.0.0",
    ]));
    let child = spawn(&[
        "rollout", "--stack", "devfleet", "--to", "3.0.0", "--bake", "60", "--json",
    ]);
    sicken(&amis["3.0.0"]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    let d = json(&out);
    assert_eq!(d[0]["state"], "failed", "{d}");
    assert!(
        d[0]["reason"]
            .as_str()
            .unwrap()
            .contains("devos-pub@1.0.0, which the stack ran before, is marked bad for it"),
        "{d}"
    );
    assert!(d[0]["rollback"].is_null(), "{d}");
    assert_eq!(fx.fleet("devfleet").0, amis["3.0.0"]);
    assert_eq!(fx.history("devfleet")[0], "rollout 3.0.0 failed");
}

/// The WorkSpaces bundle script against a stand-in `aws` CLI (moto has no WorkSpaces
/// images or bundles): the calls it makes, in order, and what it prints.
#[test]
fn the_workspaces_bundle_script_images_the_workspace_and_makes_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let fake = dir.path().join("aws");
    devos_tests::write_executable(
        &fake,
        &format!(
            r#"#!/bin/sh
echo "$*" >> {calls}
case "$*" in
  *describe-workspaces*) echo "${{WS_STATE:-AVAILABLE}}" ;;
  *describe-workspace-images*--image-ids*)
    n=$(grep -c -- --image-ids {calls}); [ "$n" -ge 2 ] && echo AVAILABLE || echo PENDING ;;
  *describe-workspace-images*) echo None ;;
  *create-workspace-image*) echo wsi-0123456789 ;;
  *describe-workspace-bundles*) echo None ;;
  *create-workspace-bundle*) echo wsb-abcdefgh1 ;;
  *) echo "unexpected: $*" >&2; exit 9 ;;
esac
"#,
            calls = calls.display()
        ),
    );
    let script = devos_tests::repo_root().join("cloudformation/workspaces-bundle.sh");
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap()
    );
    let run = |state: &str| {
        Command::new(&script)
            .args(["ws-1", "devos-pub", "1.0.0+abc"])
            .env("PATH", &path)
            .env("WS_STATE", state)
            .env("WORKSPACES_POLL_SECONDS", "0")
            .output()
            .unwrap()
    };
    let out = run("AVAILABLE");
    ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "wsb-abcdefgh1");
    let log = std::fs::read_to_string(&calls).unwrap();
    let creates: Vec<&str> = log.lines().filter(|l| l.contains(" create-")).collect();
    assert_eq!(creates.len(), 2, "{log}");
    assert!(
        creates[0]
            .contains("create-workspace-image --workspace-id ws-1 --name devos-pub-1.0.0-abc"),
        "{log}"
    );
    assert!(
        creates[1].contains("create-workspace-bundle --bundle-name devos-pub-1.0.0-abc")
            && creates[1].contains("--image-id wsi-0123456789"),
        "{log}"
    );
    assert!(
        stderr(&out).contains("image wsi-0123456789 is PENDING"),
        "{}",
        stderr(&out)
    );

    let out = run("PENDING");
    refused(
        &out,
        "WorkSpace ws-1 is PENDING; it must be AVAILABLE or STOPPED",
    );
}

#[test]
fn a_raw_image_changed_since_its_build_is_not_published() {
    let fx = Fixture::new();
    let version = "0.8.0+aaaaaaaaaaaa";
    let raw = fx.version(version, 8, &[0, 2], Some(true));
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff], 2 * BLOCK + 5).unwrap();
    drop(f);
    let out = fx.run(&[
        "publish",
        "ami",
        &format!("devos-pub@{version}"),
        "--region",
        "us-east-1",
    ]);
    refused(&out, "changed since it was built");
    assert!(
        stderr(&out).contains("nothing was uploaded"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fx.resources("us-east-1", &build_id(version)),
        (vec![], vec![]),
        "the started snapshot is removed"
    );
}

#[test]
fn update_feeds_are_published_to_s3_signed_and_keep_other_versions() {
    let fx = Fixture::new();
    let fingerprint = fx.builder_key();
    let key_file = fx.dir.path().join("devos.pub");
    ok(&fx.run(&["keys", "export", key_file.to_str().unwrap()]));
    let old = fx.updatable_version("1.0.0", &fingerprint);
    let new = fx.updatable_version("1.1.0", &fingerprint);
    let url = "s3://devos-feed/devos-pub/stable/";
    let publish = |reference: &str, extra: &[&str]| {
        let mut args = vec!["publish", "updates", reference, "--to", url];
        args.extend(["--region", "us-east-1"]);
        args.extend(extra);
        fx.run(&args)
    };
    let published = |reference: &str| -> Value {
        let out = publish(reference, &["--json"]);
        ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let s3 = fx.s3();
    let objects = || -> Vec<String> {
        fx.block_on(async {
            s3.list_objects_v2()
                .bucket("devos-feed")
                .prefix("devos-pub/stable/")
                .send()
                .await
        })
        .unwrap()
        .contents()
        .iter()
        .map(|o| {
            o.key()
                .unwrap()
                .trim_start_matches("devos-pub/stable/")
                .to_owned()
        })
        .collect()
    };
    let get = |file: &str| -> (Vec<u8>, Option<String>) {
        // Read in the runtime that made the request: the body streams on its connection.
        fx.block_on(async {
            let out = s3
                .get_object()
                .bucket("devos-feed")
                .key(format!("devos-pub/stable/{file}"))
                .send()
                .await
                .unwrap();
            let cache = out.cache_control().map(str::to_owned);
            let body = out.body.collect().await.unwrap().into_bytes().to_vec();
            (body, cache)
        })
    };
    // The feed verifies as systemd-pull checks it: SHA256SUMS against its signature,
    // each file against SHA256SUMS.
    let verified_sums = || -> String {
        let (sums, cache) = get("SHA256SUMS");
        assert_eq!(
            cache.as_deref(),
            Some("no-cache"),
            "the index must not be cached"
        );
        let (sig, _) = get("SHA256SUMS.gpg");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("SHA256SUMS"), &sums).unwrap();
        std::fs::write(dir.path().join("SHA256SUMS.gpg"), &sig).unwrap();
        assert!(gpg_verifies(
            &key_file,
            &dir.path().join("SHA256SUMS"),
            &dir.path().join("SHA256SUMS.gpg")
        ));
        let sums = String::from_utf8(sums).unwrap();
        for line in sums.lines() {
            let (sha, file) = line.split_once("  ").unwrap();
            let (bytes, _) = get(file);
            let got = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
            assert_eq!(got, sha, "{file}");
        }
        sums
    };

    // No bucket: said so, by name.
    let missing = publish("devos-pub@1.0.0", &[]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains(
            "the bucket `devos-feed` of s3://devos-feed/devos-pub/stable/ does not exist"
        ),
        "{}",
        stderr(&missing)
    );
    fx.block_on(async { s3.create_bucket().bucket("devos-feed").send().await })
        .unwrap();

    // A dry run says what it would send and sends nothing.
    let dry = publish("devos-pub@1.0.0", &["--dry-run"]);
    ok(&dry);
    let said = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(said.matches("would copy").count(), 3, "{said}");
    assert!(said.contains("would sign"), "{said}");
    assert!(objects().is_empty());

    let first = published("devos-pub@1.0.0");
    assert_eq!(first["added"].as_array().unwrap().len(), 3, "{first:#}");
    assert_eq!(first["versions"], json!(["1.0.0"]));
    assert_eq!(first["feed"], json!("s3://devos-feed/devos-pub/stable/"));
    let mut listed = objects();
    listed.sort();
    // Names with `+` are also where plain HTTP finds them: S3 reads `+` in a URL's path
    // as a space, and systemd-pull asks for the names as SHA256SUMS spells them.
    let mut expected: Vec<String> = old.clone();
    expected.extend(old[..2].iter().map(|f| f.replace('+', " ")));
    expected.extend(["SHA256SUMS".into(), "SHA256SUMS.gpg".into()]);
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(verified_sums().lines().count(), 3);
    for file in &old[..2] {
        assert_eq!(get(file).0, get(&file.replace('+', " ")).0, "{file}");
    }
    let (_, cache) = get(&old[0]);
    assert!(cache.unwrap().contains("immutable"));
    let signature = get("SHA256SUMS.gpg").0;

    // Again: nothing sent (each file's sha256 is in its metadata).
    let again = published("devos-pub@1.0.0");
    assert_eq!(again["added"], json!([]));
    assert_eq!(
        get("SHA256SUMS.gpg").0,
        signature,
        "an unchanged index is not signed again"
    );
    assert_eq!(
        publish("devos-pub@1.0.0", &["--dry-run"]).status.code(),
        Some(3)
    );
    // Without its signature the feed is refused by every machine: it is signed again.
    fx.block_on(async {
        s3.delete_object()
            .bucket("devos-feed")
            .key("devos-pub/stable/SHA256SUMS.gpg")
            .send()
            .await
    })
    .unwrap();
    let dry = publish("devos-pub@1.0.0", &["--dry-run"]);
    ok(&dry);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would sign"));
    ok(&publish("devos-pub@1.0.0", &[]));
    verified_sums();

    // While another devos-build publishes to the feed, it waits its turn.
    let feed_id = format!(
        "{:x}",
        <sha2::Sha256 as sha2::Digest>::digest(url.trim_end_matches('/').as_bytes())
    );
    let busy = std::fs::File::create(
        fx.registry()
            .with_file_name(format!("registry.db.feed-{}.lock", &feed_id[..16])),
    )
    .unwrap();
    busy.try_lock().unwrap();
    refused(
        &publish("devos-pub@1.1.0", &[]),
        &format!("another devos-build is publishing to the feed {url}"),
    );
    assert_eq!(objects().len(), expected.len());
    drop(busy);

    // A bundle file that changed since the build goes to no feed (the bundle's first:
    // none of it goes).
    let changed = fx
        .dir
        .path()
        .join(format!("images/1.1.0/update/{}", new[0]));
    let bytes = std::fs::read(&changed).unwrap();
    let mut flipped = bytes.clone();
    flipped[100] ^= 1;
    std::fs::write(&changed, &flipped).unwrap();
    let index = get("SHA256SUMS").0;
    refused(
        &publish("devos-pub@1.1.0", &[]),
        "changed since it was built",
    );
    assert_eq!(objects().len(), expected.len());
    assert_eq!(get("SHA256SUMS").0, index);
    std::fs::write(&changed, &bytes).unwrap();

    // The next version joins the feed; the first stays offered.
    let second = published("devos-pub@1.1.0");
    assert_eq!(second["added"].as_array().unwrap().len(), 3, "{second:#}");
    assert_eq!(second["versions"], json!(["1.1.0", "1.0.0"]));
    let sums = verified_sums();
    assert_eq!(sums.lines().count(), 6, "{sums}");
    for f in old.iter().chain(&new) {
        assert!(sums.contains(f.as_str()), "{f}: {sums}");
    }

    // A file removed from the bucket by hand is no longer listed after the next publish.
    fx.block_on(async {
        s3.delete_object()
            .bucket("devos-feed")
            .key(format!("devos-pub/stable/{}", old[2]))
            .send()
            .await
    })
    .unwrap();
    ok(&publish("devos-pub@1.1.0", &["--force"]));
    let sums = verified_sums();
    assert_eq!(sums.lines().count(), 5, "{sums}");
    assert!(!sums.contains(old[2].as_str()));

    // Someone who can write to the bucket but holds no key slips a version into the
    // index (its file uploaded, the old signature left): machines refuse that index,
    // and the next publish must not sign it. It makes the index again from what this
    // registry built, and names what it left out.
    let put = |file: &str, body: &[u8]| {
        fx.block_on(async {
            s3.put_object()
                .bucket("devos-feed")
                .key(format!("devos-pub/stable/{file}"))
                .body(body.to_vec().into())
                .send()
                .await
        })
        .unwrap();
    };
    let forged = "devos-pub_9.0.0.efi";
    put(forged, b"not a kernel");
    let mut index = String::from_utf8(get("SHA256SUMS").0).unwrap();
    // And changes the hash of a file this registry built: that entry goes too.
    let built = index
        .lines()
        .find(|l| l.ends_with(old[0].as_str()))
        .unwrap()
        .to_owned();
    index = index.replace(&built, &format!("{}  {}", "0".repeat(64), old[0]));
    index.push_str(&format!(
        "{:x}  {forged}\n",
        <sha2::Sha256 as sha2::Digest>::digest(b"not a kernel")
    ));
    put("SHA256SUMS", index.as_bytes());
    let dry = publish("devos-pub@1.1.0", &["--dry-run"]);
    ok(&dry);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would sign"));
    let out = publish("devos-pub@1.1.0", &["--json"]);
    ok(&out);
    for said in [
        "SHA256SUMS is not signed by this builder's key".to_owned(),
        "left out, as nothing vouches for them (their files stay): ".to_owned(),
        format!("{forged} (not built here)"),
        format!("{} (listed with another hash than built)", old[0]),
    ] {
        assert!(stderr(&out).contains(&said), "{}", stderr(&out));
    }
    let republished: Value = serde_json::from_slice(&out.stdout).unwrap();
    // (1.0.0's UKI was removed above and its root left out now: the feed offers 1.1.0,
    // and 1.0.0's hash tree.)
    assert_eq!(republished["versions"], json!(["1.1.0"]));
    let sums = verified_sums();
    assert_eq!(sums.lines().count(), 4, "{sums}");
    assert!(
        !sums.contains(forged) && !sums.contains(old[0].as_str()),
        "{sums}"
    );

    // Only a directory or s3:// is a feed.
    let web = fx.run(&[
        "publish",
        "updates",
        "devos-pub@1.1.0",
        "--to",
        "https://updates.example.com/x",
    ]);
    assert!(!web.status.success());
    assert!(
        stderr(&web).contains("a directory or to s3://BUCKET/PREFIX"),
        "{}",
        stderr(&web)
    );
}

/// The suspended processes of Auto Scaling group `group` (sorted) and its
/// `devos:suspended` tag.
async fn suspended(asg: &sdk_autoscaling::Client, group: &str) -> (Vec<String>, Option<String>) {
    let out = asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .unwrap();
    let g = &out.auto_scaling_groups()[0];
    let mut processes: Vec<String> = g
        .suspended_processes()
        .iter()
        .map(|p| p.process_name().unwrap().to_owned())
        .collect();
    processes.sort();
    let tag = g
        .tags()
        .iter()
        .find(|t| t.key() == Some("devos:suspended"))
        .and_then(|t| t.value())
        .map(str::to_owned);
    (processes, tag)
}

/// The agents of a fleet's instances, as the rollout sees them through EC2 (moto runs
/// no image): each polls its instance's tags and, when asked for a version it does not
/// report, reports it a moment later — healthy, or for `failing` versions (from the
/// `nth` instance asked on) a failure: after its boot tries (`failed`), or of the
/// install (`not moved`). Records, at each first sight of a request, how many instances
/// were asked and not yet done (the batch), and the group's suspended processes.
struct Agents {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    in_flight: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    held: std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agents {
    fn start(
        ec2: sdk_ec2::Client,
        (asg, group): (sdk_autoscaling::Client, String),
        ids: Vec<String>,
        failing: &'static [(&'static str, usize, &'static str)],
    ) -> Agents {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let in_flight = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (halt, seen, seen_held) = (stop.clone(), in_flight.clone(), held.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut asked_for: std::collections::HashMap<(String, String), std::time::Instant> =
                Default::default();
            let mut failures: std::collections::HashMap<&str, usize> = Default::default();
            while !halt.load(Ordering::Relaxed) {
                let tags = |id: String| {
                    let ec2 = ec2.clone();
                    async move {
                        let out = ec2
                            .describe_instances()
                            .instance_ids(&id)
                            .send()
                            .await
                            .unwrap();
                        let i = out.reservations()[0].instances()[0].clone();
                        i.tags()
                            .iter()
                            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
                            .collect::<std::collections::BTreeMap<_, _>>()
                    }
                };
                let now: Vec<_> = ids
                    .iter()
                    .map(|id| (id.clone(), rt.block_on(tags(id.clone()))))
                    .collect();
                for (id, t) in &now {
                    let (Some(want), running) = (t.get("devos:update-to"), t.get("devos:running"))
                    else {
                        continue;
                    };
                    let state = t.get("devos:update-state").map_or("", String::as_str);
                    if running == Some(want) && state == "healthy" {
                        continue;
                    }
                    let key = (id.clone(), want.clone());
                    if !asked_for.contains_key(&key) {
                        let busy = now
                            .iter()
                            .filter(|(_, o)| {
                                o.get("devos:update-to") == Some(want)
                                    && !(o.get("devos:running") == Some(want)
                                        && o.get("devos:update-state").map(String::as_str)
                                            == Some("healthy"))
                            })
                            .count();
                        seen.lock().unwrap().push(busy);
                        seen_held
                            .lock()
                            .unwrap()
                            .push(rt.block_on(suspended(&asg, &group)).0);
                        asked_for.insert(key.clone(), std::time::Instant::now());
                        continue;
                    }
                    if asked_for[&key].elapsed() < Duration::from_millis(1500)
                        || state.starts_with(&format!("failed {want}:"))
                        || state.starts_with(&format!("not moved to {want}:"))
                    {
                        continue;
                    }
                    let from = running.cloned().unwrap_or_else(|| "1.0.0".into());
                    let fail = failing.iter().find(|(version, nth, _)| {
                        want == version && {
                            let n = failures.entry(version).or_default();
                            *n += 1;
                            *n >= *nth
                        }
                    });
                    let (run, report) = match fail {
                        Some((_, _, "failed")) => (
                            from.clone(),
                            format!(
                                "failed {want}: it did not come up healthy within its boot tries; back on {from}"
                            ),
                        ),
                        Some(_) => (
                            from.clone(),
                            format!("not moved to {want}: download failed"),
                        ),
                        None => (want.clone(), "healthy".to_owned()),
                    };
                    rt.block_on(
                        ec2.create_tags()
                            .resources(id)
                            .tags(
                                sdk_ec2::types::Tag::builder()
                                    .key("devos:running")
                                    .value(run)
                                    .build(),
                            )
                            .tags(
                                sdk_ec2::types::Tag::builder()
                                    .key("devos:update-state")
                                    .value(report)
                                    .build(),
                            )
                            .send(),
                    )
                    .unwrap();
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Agents {
            stop,
            in_flight,
            held,
            thread: Some(thread),
        }
    }

    fn batches(&self) -> Vec<usize> {
        self.in_flight.lock().unwrap().clone()
    }

    /// The group's suspended processes at each first sight of a request.
    fn held(&self) -> Vec<Vec<String>> {
        self.held.lock().unwrap().clone()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn fleets_update_in_place_batch_by_batch_and_go_back_when_a_version_fails() {
    let fx = Fixture::new();
    fx.version("1.0.0", 8, &[0], Some(true));
    ok(&fx.run(&["publish", "ami", "devos-pub@1.0.0", "--region", "us-east-1"]));
    for version in ["2.0.0", "3.0.0", "5.0.0", "6.0.0"] {
        fx.updatable_version(version, "0000000000000000000000000000000000000000");
    }
    // A verified build without `[update]`: it has an update bundle, but no feed and no
    // key its machines trust (written out: a version's manifest is read).
    fx.version_with(
        "4.0.0",
        1,
        &[0],
        Some(true),
        json!({
            "suite": "trixie",
            "update": [{"file": "devos-pub_4.0.0.efi", "sha256": "00", "size": 1}],
        }),
    );
    let fleet = |args: &[&str]| fx.fleet_in_region(args);
    let in_place = |to: &str, more: &[&str]| {
        let mut args = vec!["rollout", "--stack", "devfleet", "--to", to, "--in-place"];
        args.extend_from_slice(more);
        fleet(&args)
    };
    ok(&fleet(&[
        "deploy",
        "--stack",
        "devfleet",
        "--template",
        "fleet",
        "--image",
        "devos-pub@1.0.0",
        "--param",
        "DesiredCapacity=3",
        "--bake",
        "0",
    ]));
    let (_, members) = fx.group("devfleet").unwrap();
    let ids: Vec<String> = members.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 3);
    let tag_of = |key: &str| -> Vec<Option<String>> {
        fx.block_on(async {
            let out = fx
                .ec2("us-east-1")
                .describe_instances()
                .set_instance_ids(Some(ids.clone()))
                .send()
                .await
                .unwrap();
            let mut by_id: Vec<(String, Option<String>)> = out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .map(|i| {
                    let v = i
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(key))
                        .and_then(|t| t.value());
                    (i.instance_id().unwrap().to_owned(), v.map(str::to_owned))
                })
                .collect();
            by_id.sort();
            by_id.into_iter().map(|(_, v)| v).collect()
        })
    };

    // Refused: a version built without `[update]`, and bad batch sizes.
    let out = in_place("4.0.0", &[]);
    refused(
        &out,
        "cannot update machines in place: its spec has no `[update]`",
    );
    let out = in_place("2.0.0", &["--batch", "0"]);
    refused(&out, "invalid value '0' for '--batch <BATCH>'");
    assert_eq!(out.status.code(), Some(2));

    // A dry run lists the instances and asks none of them.
    let out = in_place("2.0.0", &["--dry-run", "--json"]);
    ok(&out);
    let d = json(&out);
    assert_eq!(d["state"], "dry-run", "{d}");
    assert_eq!(d["instances"].as_array().unwrap().len(), 3, "{d}");
    assert_eq!(tag_of("devos:update-to"), vec![None, None, None]);

    // Someone suspended one of the processes a rollout holds before it: it stays
    // suspended after the rollout, which resumes only what it suspended.
    let (group, none, _) = fx.processes("devfleet");
    assert!(none.is_empty(), "{none:?}");
    let asg = fx.sdk("us-east-1", sdk_autoscaling::Client::new);
    fx.block_on(
        asg.suspend_processes()
            .auto_scaling_group_name(&group)
            .scaling_processes("AZRebalance")
            .send(),
    )
    .unwrap();

    // 1.0.0 -> 2.0.0 in batches of two: never more than two instances asked at once.
    let agents = Agents::start(
        fx.ec2("us-east-1"),
        (asg.clone(), group.clone()),
        ids.clone(),
        &[("3.0.0", 2, "failed"), ("6.0.0", 2, "not moved")],
    );
    let out = in_place(
        "2.0.0",
        &[
            "--batch",
            "2",
            "--batch-timeout",
            "120",
            "--bake",
            "2",
            "--json",
        ],
    );
    ok(&out);
    let d = json(&out);
    assert_eq!(
        (&d["kind"], &d["state"]),
        (&json!("in-place"), &json!("succeeded")),
        "{d}"
    );
    assert_eq!(tag_of("devos:running"), vec![Some("2.0.0".to_owned()); 3]);
    assert!(
        agents.batches().iter().all(|&n| n <= 2),
        "{:?}",
        agents.batches()
    );
    assert!(agents.batches().contains(&2), "{:?}", agents.batches());
    // While instances moved, Auto Scaling could neither replace nor scale them in; then
    // the processes the rollout suspended were resumed, the one suspended before not.
    let hold = [
        "AZRebalance",
        "AlarmNotification",
        "HealthCheck",
        "ReplaceUnhealthy",
        "ScheduledActions",
    ];
    assert!(
        !agents.held().is_empty() && agents.held().iter().all(|h| h == &hold),
        "{:?}",
        agents.held()
    );
    assert!(
        stderr(&out).contains("suspended while instances move"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fx.processes("devfleet"),
        (group.clone(), vec!["AZRebalance".to_owned()], None)
    );
    let status = fx.run(&[
        "fleet",
        "status",
        "--stack",
        "devfleet",
        "--region",
        "us-east-1",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&status.stdout)
            .matches("runs 2.0.0 (healthy)")
            .count(),
        3,
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    // Again: every instance is there already.
    let d = json(&in_place("2.0.0", &["--json"]));
    assert_eq!(d["state"], "unchanged", "{d}");

    // 2.0.0 -> 3.0.0 one at a time; the second instance comes back on 2.0.0 by itself:
    // the rollout stops, the first instance is told to go back, the third is never
    // asked, and 3.0.0 is bad for the stack.
    let out = in_place(
        "3.0.0",
        &["--batch-timeout", "120", "--bake", "0", "--json"],
    );
    assert!(!out.status.success());
    let d = json(&out);
    assert_eq!(d["state"], "rolled-back", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("failed 3.0.0: it did not come up healthy"),
        "{d}"
    );
    assert_eq!(tag_of("devos:running"), vec![Some("2.0.0".to_owned()); 3]);
    let asked = tag_of("devos:update-to");
    assert_eq!(
        asked
            .iter()
            .filter(|t| t.as_deref() == Some("2.0.0"))
            .count(),
        3,
        "{asked:?}"
    );
    let out = in_place("3.0.0", &[]);
    assert!(stderr(&out).contains("marked bad"), "{}", stderr(&out));

    // 2.0.0 -> 6.0.0 one at a time; the second instance cannot install it (says
    // nothing about the version): the rollout stops, the first stays on 6.0.0, the
    // second is told to stay on 2.0.0, and 6.0.0 is not marked bad.
    let out = in_place(
        "6.0.0",
        &["--batch-timeout", "120", "--bake", "0", "--json"],
    );
    assert!(!out.status.success());
    let d = json(&out);
    assert_eq!(d["state"], "failed", "{d}");
    let reason = d["reason"].as_str().unwrap();
    for said in [
        "not moved to 6.0.0: download failed",
        "6.0.0 is not marked bad",
        "runs it and stays",
    ] {
        assert!(reason.contains(said), "{said}: {d}");
    }
    let count =
        |tags: &[Option<String>], v: &str| tags.iter().filter(|t| t.as_deref() == Some(v)).count();
    let running = tag_of("devos:running");
    assert_eq!(
        (count(&running, "6.0.0"), count(&running, "2.0.0")),
        (1, 2),
        "{running:?}"
    );
    let asked = tag_of("devos:update-to");
    assert_eq!(
        (count(&asked, "6.0.0"), count(&asked, "2.0.0")),
        (1, 2),
        "{asked:?}"
    );
    // The one that could not install was waited for until it reported itself healthy
    // where it is: a rollout run again reads fresh reports, not the old failure.
    let states = tag_of("devos:update-state");
    assert_eq!(count(&states, "healthy"), 3, "{states:?}");
    // What they ran before, rolled out in place, brings the one on 6.0.0 back.
    ok(&in_place(
        "2.0.0",
        &["--batch-timeout", "120", "--bake", "0"],
    ));
    assert_eq!(tag_of("devos:running"), vec![Some("2.0.0".to_owned()); 3]);
    drop(agents);

    // Agents that never answer (tags not in their metadata, an older agent): the
    // rollout fails after the batch timeout, and the version is not blamed for it.
    let out = in_place("5.0.0", &["--batch-timeout", "3", "--bake", "0", "--json"]);
    assert!(!out.status.success());
    let d = json(&out);
    assert_eq!(d["state"], "failed", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("no agent of the batch acted"),
        "{d}"
    );
    assert_eq!(tag_of("devos:running"), vec![Some("2.0.0".to_owned()); 3]);
    // The instance asked is told to stay where it is.
    let asked = tag_of("devos:update-to");
    assert_eq!(count(&asked, "2.0.0"), 3, "{asked:?}");
    let out = in_place("5.0.0", &["--dry-run"]);
    ok(&out);

    assert_eq!(
        fx.history("devfleet"),
        [
            "in-place 5.0.0 failed",
            "in-place 2.0.0 succeeded",
            "in-place 6.0.0 failed",
            "in-place 3.0.0 rolled-back",
            "in-place 2.0.0 succeeded",
            "deploy 1.0.0 succeeded",
        ]
    );
    // Every failed rollout above resumed what it suspended too.
    assert_eq!(
        fx.processes("devfleet"),
        (group.clone(), vec!["AZRebalance".to_owned()], None)
    );

    // A rollout killed while it held the group (its tag names what it suspended; it got
    // as far as suspending one): status says so, and the next in-place rollout of the
    // stack, even one with nothing to do, resumes it and only it.
    fx.block_on(async {
        asg.create_or_update_tags()
            .tags(
                sdk_autoscaling::types::Tag::builder()
                    .resource_id(&group)
                    .resource_type("auto-scaling-group")
                    .key("devos:suspended")
                    .value("AlarmNotification,ScheduledActions")
                    .propagate_at_launch(false)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        asg.suspend_processes()
            .auto_scaling_group_name(&group)
            .scaling_processes("AlarmNotification")
            .send()
            .await
            .unwrap();
    });
    let status = fx.run(&[
        "fleet",
        "status",
        "--stack",
        "devfleet",
        "--region",
        "us-east-1",
    ]);
    ok(&status);
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        said.contains("suspended by an in-place rollout: AlarmNotification ("),
        "{said}"
    );
    let d = json(&in_place("2.0.0", &["--json"]));
    assert_eq!(d["state"], "unchanged", "{d}");
    assert_eq!(
        fx.processes("devfleet"),
        (group.clone(), vec!["AZRebalance".to_owned()], None)
    );

    // Again, and the next rollout is refused (3.0.0 is bad for the stack): it resumes
    // them all the same. A tag that outlived what it named (resumed by hand) is dropped,
    // and nothing is resumed for it.
    let killed = |named: &str, suspended: &str| {
        fx.block_on(async {
            asg.create_or_update_tags()
                .tags(
                    sdk_autoscaling::types::Tag::builder()
                        .resource_id(&group)
                        .resource_type("auto-scaling-group")
                        .key("devos:suspended")
                        .value(named)
                        .propagate_at_launch(false)
                        .build(),
                )
                .send()
                .await
                .unwrap();
            if !suspended.is_empty() {
                asg.suspend_processes()
                    .auto_scaling_group_name(&group)
                    .scaling_processes(suspended)
                    .send()
                    .await
                    .unwrap();
            }
        })
    };
    killed("HealthCheck,ReplaceUnhealthy", "HealthCheck");
    let out = in_place("3.0.0", &[]);
    refused(&out, "marked bad");
    assert_eq!(
        fx.processes("devfleet"),
        (group.clone(), vec!["AZRebalance".to_owned()], None)
    );
    killed("ScheduledActions", "");
    ok(&in_place("2.0.0", &[]));
    assert_eq!(
        fx.processes("devfleet"),
        (group.clone(), vec!["AZRebalance".to_owned()], None)
    );

    // Stopped by Ctrl-C while it waits for a batch (no agent answers): what it
    // suspended is resumed, and the rollout is recorded as interrupted.
    let rollout = fx
        .cmd(&[
            "fleet",
            "rollout",
            "--stack",
            "devfleet",
            "--to",
            "5.0.0",
            "--in-place",
            "--batch-timeout",
            "600",
            "--region",
            "us-east-1",
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || fx.processes("devfleet").1.len()
            == 5),
        "the rollout never suspended the group's processes"
    );
    std::thread::sleep(Duration::from_secs(1));
    let sent = Command::new("kill")
        .args(["-INT", &rollout.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = rollout.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted by SIGINT"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fx.processes("devfleet"),
        (group, vec!["AZRebalance".to_owned()], None)
    );
    assert_eq!(fx.history("devfleet")[0], "in-place 5.0.0 failed");
}

/// A Packer AMI is a stock Ubuntu with the agent: `provision.sh` gives it the rule that
/// keeps instance metadata (the instance role) for root, as images devos-build makes
/// have. The rule script as provision.sh installs it, run twice in a network namespace
/// of its own, with a second one behind a veth pair holding both metadata addresses
/// and a listener on each: root and EC2 Instance Connect's user get through, uid 65534
/// is refused with "Permission denied".
#[test]
fn packer_amis_keep_instance_metadata_for_root() {
    devos_tests::require_root();
    for program in ["unshare", "nsenter", "setpriv"] {
        require(program, "util-linux");
    }
    require("ip", "iproute2");
    let provision =
        std::fs::read_to_string(devos_tests::repo_root().join("packer/provision.sh")).unwrap();
    let start = "cat > /usr/local/lib/devos/metadata-root-only <<'RULES'\n";
    let rules = provision
        .split_once(start)
        .and_then(|(_, rest)| rest.split_once("\nRULES\n"))
        .map(|(rules, _)| rules)
        .expect("provision.sh writes the metadata rule script");
    let unit = "ExecStart=/usr/local/lib/devos/metadata-root-only";
    assert!(provision.contains(unit), "{provision}");
    assert!(provision.contains("systemctl enable devos-metadata-root-only.service"));
    assert!(provision.contains("ManageForeignRoutingPolicyRules=no"));

    // EC2 Instance Connect's system user (Ubuntu's AMIs have it) may read its keys.
    let added = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg("ec2-instance-connect")
        .status()
        .unwrap();
    // (9: it exists already.)
    assert!(matches!(added.code(), Some(0 | 9)), "useradd: {added}");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("metadata-root-only");
    std::fs::write(&script, rules).unwrap();
    let check = r#"
set -eu
# This namespace is the instance; a second one, over a veth pair, is EC2's metadata
# service (an address on the instance's own loopback would take the local table,
# before any policy rule).
unshare --net sleep 600 &
imds=$!
pids=$imds
trap 'kill $pids 2>/dev/null || true' EXIT
until [ "$(readlink /proc/$imds/ns/net)" != "$(readlink /proc/$$/ns/net)" ]; do sleep 0.05; done
in_imds() { nsenter --net=/proc/$imds/ns/net "$@"; }
ip link set lo up
ip link add veth0 type veth peer name veth1
ip link set veth1 netns /proc/$imds/ns/net
ip addr add 10.9.0.1/24 dev veth0
ip link set veth0 up
ip route add 169.254.169.254/32 via 10.9.0.2
in_imds ip link set lo up
in_imds ip addr add 10.9.0.2/24 dev veth1
in_imds ip addr add 169.254.169.254/32 dev lo
in_imds ip link set veth1 up
addresses=169.254.169.254
if [ -e /proc/sys/net/ipv6 ]; then
  ip -6 addr add fd09::1/64 dev veth0 nodad
  ip -6 route add fd00:ec2::254/128 via fd09::2
  in_imds ip -6 addr add fd09::2/64 dev veth1 nodad
  in_imds ip -6 addr add fd00:ec2::254/128 dev lo nodad
  addresses="$addresses fd00:ec2::254"
fi
# Twice, as at every boot of a machine whose rules survived: replaced, not added.
sh "$1"; sh "$1"
[ "$(ip -4 rule show pref 100 | wc -l)" = 1 ] || { ip -4 rule show; exit 1; }
for a in $addresses; do
  in_imds /usr/bin/python3 -c '
import socket, sys
a = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET)
s.bind((a, 80)); s.listen(8)
while True: s.accept()[0].close()' "$a" >/dev/null 2>&1 &
  pids="$pids $!"
done
connect() { timeout 5 bash -c "exec 3<>/dev/tcp/$1/80" 2>&1; }
for a in $addresses; do
  tries=0
  until connect "$a" >/dev/null; do
    tries=$((tries + 1)); [ "$tries" -lt 600 ] || { echo "root cannot reach $a: $(connect "$a")"; exit 1; }
    sleep 0.1
  done
  if out=$(setpriv --reuid=65534 --regid=65534 --clear-groups timeout 5 bash -c "exec 3<>/dev/tcp/$a/80" 2>&1); then
    echo "uid 65534 reached $a"; exit 1
  fi
  connect=$(id -u ec2-instance-connect)
  setpriv --reuid="$connect" --regid=65534 --clear-groups timeout 5 bash -c "exec 3<>/dev/tcp/$a/80" ||
    { echo "ec2-instance-connect cannot reach $a"; exit 1; }
  case "$out" in *"Permission denied"*) echo "refused: $a" ;; *) echo "$a: $out"; exit 1 ;; esac
done
"#;
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", check, "check"])
        .arg(&script)
        .output()
        .unwrap();
    ok(&out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("refused: 169.254.169.254"), "{said}");
}
