//! The `devos-build` command line: clap definitions (doc comments are the help text)
//! and one function per verb.

pub mod doctor;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::boottest;

use crate::boottest::TestOptions;
use crate::build;
use crate::build::BuildOptions;
use crate::build::repro;
use crate::inventory;
use crate::model::spec::DEFAULT_SPEC;
use crate::model::spec::Format;
use crate::publish;
use crate::store::cache;
use crate::store::cache::Cache;
use crate::store::registry;
use crate::store::registry::Registry;
use crate::store::registry::TestRun;
use crate::support::ui::Ui;

/// Build, boot-test and publish immutable DevOS images from declarative specs.
#[derive(Parser)]
#[command(name = "devos-build", version, about)]
pub struct Cli {
    /// Log every external command and more (also: DEVOS_LOG=debug).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// The image registry (SQLite). Default: ~/.local/share/devos/registry.db.
    #[arg(long, global = true, env = "DEVOS_REGISTRY", value_name = "FILE")]
    pub registry: Option<PathBuf>,
    /// The builder's settings file (AWS endpoint, SSM prefix, ...). Default:
    /// ~/.config/devos/config.toml.
    #[arg(long, global = true, env = "DEVOS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Build, test and inspect images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Inspect and prune the build cache (stage outputs, packages, package lists).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Publish tested versions as AMIs and manage what was published.
    #[command(subcommand)]
    Publish(PublishCommand),
    /// Render Packer templates.
    #[command(subcommand)]
    Packer(PackerCommand),
    /// Fleets of instances running an image (CloudFormation).
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Check the host tools the builder needs and say how to install missing ones.
    Doctor {
        /// Machine-readable output on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build an image from a spec: rootfs, customize, disk, convert.
    Build {
        /// The image spec.
        #[arg(default_value = DEFAULT_SPEC)]
        spec: PathBuf,
        /// Output directory. Default: target/images/<name>/<version>/.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Use this prebuilt agent package instead of building devos-agent from source.
        #[arg(long, value_name = "DEB")]
        agent_deb: Option<PathBuf>,
        /// Rebuild even if this exact version was already built.
        #[arg(long)]
        force: bool,
        /// Build every stage from scratch: neither use nor fill the stage cache.
        #[arg(long)]
        no_cache: bool,
        /// Build twice from scratch and fail unless the two are bit-for-bit identical.
        #[arg(long)]
        check_reproducible: bool,
        /// Boot-test the image after building it; fail if the test fails.
        #[arg(long)]
        test: bool,
        #[command(flatten)]
        vm: VmArgs,
        /// Print the manifest (and test report) as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print the build id and every input that went into it, without building.
    Plan {
        /// The image spec.
        #[arg(default_value = DEFAULT_SPEC)]
        spec: PathBuf,
        /// Use this prebuilt agent package instead of building devos-agent from source.
        #[arg(long, value_name = "DEB")]
        agent_deb: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List the images and versions in the registry, newest first.
    List {
        /// Only this image.
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one version: artifacts, stage timings, boot-test runs.
    Show {
        /// NAME (its newest version), NAME@VERSION, or NAME@ a unique prefix of one.
        reference: String,
        #[arg(long)]
        json: bool,
    },
    /// Compare two versions: packages added, removed and changed, files, sizes.
    Diff {
        from: String,
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// Recompute the sha256 of a version's artifacts and compare with the registry.
    Verify {
        reference: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete old versions' artifacts and the cache entries only they used. The
    /// newest version that passed a boot test is always kept.
    Gc {
        /// Versions to keep per image, newest first.
        #[arg(long, default_value_t = 3)]
        keep: usize,
        /// Only this image.
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Boot an image under QEMU and check that it comes up and its agent answers.
    Test {
        /// An image file, an output directory, a spec (its newest build), or
        /// NAME[@VERSION] from the registry.
        #[arg(default_value = DEFAULT_SPEC)]
        target: PathBuf,
        #[command(flatten)]
        vm: VmArgs,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Convert a version's raw image to another format (vmdk: streamOptimized, vhd:
    /// fixed, whole MiB; qcow2) and record it with its sha256.
    Export {
        reference: String,
        #[arg(long, value_parser = ["qcow2", "vmdk", "vhd"])]
        format: String,
        /// Write here instead of next to the raw image (not recorded in the registry).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Boot an image interactively with the serial console on this terminal.
    Boot {
        /// An image file, an output directory, a spec (its newest build), or
        /// NAME[@VERSION] from the registry.
        #[arg(default_value = DEFAULT_SPEC)]
        target: PathBuf,
        /// Forward this host port (on 127.0.0.1) to the guest's SSH port.
        #[arg(long)]
        ssh_port: Option<u16>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Guest CPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
    },
}

#[derive(Subcommand)]
pub enum PublishCommand {
    /// Upload a tested version to an EBS snapshot (EBS direct APIs), register it as an
    /// AMI, copy it to more regions, and write its SSM parameters. Idempotent.
    Ami {
        /// NAME@VERSION (or NAME: its newest version).
        reference: String,
        /// The region to upload to. Default: `[aws] region`, else AWS_REGION / the profile's.
        #[arg(long)]
        region: Option<String>,
        /// Copy the AMI to these regions too (comma-separated).
        #[arg(long, value_delimiter = ',')]
        copy_to: Vec<String>,
        /// The AMI name. Default: NAME-VERSION with `+` as `-`.
        #[arg(long)]
        name: Option<String>,
        /// Publish even without a passing boot test (loudly; the AMI is tagged so).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        aws: AwsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Point PREFIX/NAME/latest at this version's AMI in every region it is in.
    Promote {
        reference: String,
        /// Only these regions (comma-separated). Default: all it is published in.
        #[arg(long, value_delimiter = ',')]
        region: Vec<String>,
        #[command(flatten)]
        aws: AwsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Everything published, newest first.
    List {
        /// Only this image.
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Build an AMI with Packer from the latest official Ubuntu base AMI, installing
    /// this version's agent package and config; records the AMI it made.
    Packer {
        reference: String,
        #[arg(long)]
        region: Option<String>,
        /// Render the variant without a communicator (nothing is provisioned): for
        /// endpoints without real instances, such as test servers.
        #[arg(long)]
        no_communicator: bool,
        /// Passed to `packer build -var` (e.g. base_ami_name=..., instance_type=...).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Publish even without a passing boot test.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        aws: AwsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Deregister a version's AMIs in every region and delete their snapshots and
    /// SSM parameters.
    Deregister {
        reference: String,
        /// Even if PREFIX/NAME/latest points at it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        aws: AwsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Read the uploaded snapshot back (EBS direct APIs) and compare it with the raw
    /// image, block by block.
    Verify {
        reference: String,
        #[arg(long)]
        region: String,
        #[command(flatten)]
        aws: AwsArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Render a CloudFormation template for a published, tested version.
    Render {
        #[arg(value_enum)]
        template: crate::fleet::Template,
        /// NAME@VERSION (or NAME: its newest version).
        #[arg(long)]
        image: String,
        #[arg(long)]
        region: String,
        /// Write here instead of to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Create a stack from a template for a tested, published version, or update the
    /// stack to it. Network parameters default to the default VPC and its subnets.
    Deploy {
        #[command(flatten)]
        stack: StackArgs,
        #[arg(long, value_enum)]
        template: crate::fleet::Template,
        /// NAME@VERSION (or NAME: its newest version).
        #[arg(long)]
        image: String,
        /// A template parameter (InstanceType=t3.large, DesiredCapacity=4, KeyName=...).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Roll a stack to a version (canary stack first), health-gated; a failed update or
    /// gate rolls back and marks the version bad for the stack.
    Rollout {
        #[command(flatten)]
        stack: StackArgs,
        /// VERSION (of the stack's image) or NAME@VERSION.
        #[arg(long)]
        to: String,
        /// Roll this stack first; the main stack only if it passes its gate.
        #[arg(long, value_name = "STACK")]
        canary_stack: Option<String>,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Roll a stack back: to VERSION, or to the last version that passed its gate there.
    Rollback {
        #[command(flatten)]
        stack: StackArgs,
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// What a stack runs: its version, launch template, instances and last rollout.
    Status {
        #[command(flatten)]
        stack: StackArgs,
        #[arg(long)]
        json: bool,
    },
    /// Every deploy, rollout and rollback the registry recorded, newest first.
    History {
        /// Only this stack.
        #[arg(long)]
        stack: Option<String>,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct StackArgs {
    /// The CloudFormation stack.
    #[arg(long = "stack", value_name = "STACK")]
    name: String,
    /// Default: `[aws] region`, else AWS_REGION / the profile's.
    #[arg(long)]
    region: Option<String>,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Args)]
pub struct ChangeArgs {
    /// Show the change set (what would be replaced) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds the health gate watches the new version after the stack update.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    bake: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum PackerCommand {
    /// Write the HCL2 template and what it installs for a version into a directory,
    /// and check it with `packer validate`.
    Render {
        reference: String,
        /// Default: `packer/` in the version's output directory.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        region: Option<String>,
        /// The variant without a communicator (see `publish packer`).
        #[arg(long)]
        no_communicator: bool,
        #[command(flatten)]
        aws: AwsArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct AwsArgs {
    /// A profile of ~/.aws/config. Default: `[aws] profile`, else AWS_PROFILE.
    #[arg(long)]
    profile: Option<String>,
    /// One endpoint for every AWS service (other partitions, test servers). Default:
    /// `[aws] endpoint-url`; AWS_ENDPOINT_URL also works.
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Where the cache is, its size, and every stage entry.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove stage entries (all but the --keep most recently used of each stage).
    Prune {
        #[arg(long, default_value_t = 0)]
        keep: usize,
        /// Also remove downloaded packages and package lists.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct VmArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Give up on the boot test after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// Keep the test VM's overlay and console log, and print where.
    #[arg(long)]
    keep: bool,
    /// Also write the results as JUnit XML to this file (for CI systems).
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
}

impl VmArgs {
    fn options(&self) -> TestOptions {
        TestOptions {
            memory_mib: self.memory,
            cpus: self.cpus,
            timeout: Duration::from_secs(self.timeout),
            keep: self.keep,
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let mut ui = Ui::new();
    init_logging(cli.verbose, &ui);
    let registry_path = cli.registry.clone().unwrap_or_else(registry::default_path);
    let open = || Registry::open(&registry_path);
    let config = cli.config.clone();
    let settings = || crate::model::settings::load(config.as_deref());
    match cli.command {
        Command::Publish(cmd) => publish_command(cmd, &mut open()?, &settings()?, &ui),
        Command::Fleet(FleetCommand::Render {
            template,
            image,
            region,
            out,
        }) => {
            let yaml = crate::fleet::render(&open()?, template, &image, &region)?;
            match out {
                Some(path) => std::fs::write(&path, yaml)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{yaml}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fleet(cmd) => fleet_command(cmd, &mut open()?, &settings()?),
        Command::Packer(PackerCommand::Render {
            reference,
            out,
            region,
            no_communicator,
            aws,
            json,
        }) => {
            let settings = settings()?;
            let opts = packer_options(&settings, region, aws, !no_communicator, out)?;
            let r = crate::publish::packer::render(&open()?, &reference, &opts)?;
            output(
                json,
                &r,
                || format!("{} (packer validate: ok)\n", r.template.display()),
                true,
            )
        }
        Command::Image(ImageCommand::Export {
            reference,
            format,
            out,
            json,
        }) => {
            let format = match format.as_str() {
                "qcow2" => Format::Qcow2,
                "vmdk" => Format::Vmdk,
                _ => Format::Vhd,
            };
            let e =
                crate::inventory::export::export(&mut open()?, &reference, format, out.as_deref())?;
            output(
                json,
                &e,
                || {
                    format!(
                        "{} {}: {} ({} MiB, sha256 {})\n",
                        e.version,
                        format.extension(),
                        e.path.display(),
                        e.size >> 20,
                        e.sha256
                    )
                },
                true,
            )
        }
        Command::Doctor { json } => {
            let report = crate::cli::doctor::check();
            let ok = report.tools.iter().all(|t| t.found.is_some());
            output(json, &report, || report.human(), ok)
        }
        Command::Cache(CacheCommand::Status { json }) => {
            let status = Cache::new(cache::dir(), true).status()?;
            output(json, &status, || status.human(), true)
        }
        Command::Cache(CacheCommand::Prune { keep, all, json }) => {
            let pruned = Cache::new(cache::dir(), true).prune(keep, all)?;
            output(
                json,
                &pruned,
                || {
                    format!(
                        "removed {} stage entries{}, freed {}\n",
                        pruned.entries,
                        if all { " and the package caches" } else { "" },
                        cache::mib(pruned.bytes)
                    )
                },
                true,
            )
        }
        Command::Image(ImageCommand::Build {
            spec,
            out,
            agent_deb,
            force,
            no_cache,
            check_reproducible,
            test,
            vm,
            json,
        }) => {
            let opts = BuildOptions {
                spec,
                out,
                agent_deb,
                force,
                no_cache,
                registry: Some(registry_path.clone()),
            };
            let (built, repro) = if check_reproducible {
                let (built, report) = repro::check(&opts, &mut ui)?;
                (built, Some(report))
            } else {
                (build::build(&opts, &mut ui)?, None)
            };
            let report = if test {
                let spec = crate::model::spec::load(&opts.spec)?;
                let target = boottest::Target::from_dir(&built.dir, Some(&spec))?;
                ui.info("==> boot test");
                Some(run_test(&target, &vm, &registry_path)?)
            } else {
                None
            };
            let value = serde_json::json!({
                "dir": built.dir,
                "fresh": built.fresh,
                "manifest": built.manifest,
                "reproducible": repro,
                "test": report,
            });
            let human = || {
                let mut s = format!("{} {}\n", built.manifest.name, built.manifest.version);
                s.push_str(&format!("  output: {}\n", built.dir.display()));
                for a in &built.manifest.artifacts {
                    s.push_str(&format!(
                        "  {:<48} {:>6} MiB ({} MiB used)\n",
                        a.file,
                        a.size >> 20,
                        a.used_bytes >> 20
                    ));
                }
                if let Some(r) = &repro {
                    s.push_str(&r.human());
                }
                if let Some(r) = &report {
                    s.push_str(&r.summary());
                }
                s
            };
            let ok = report.as_ref().is_none_or(|r| r.passed)
                && repro.as_ref().is_none_or(|r| r.identical);
            output(json, &value, human, ok)
        }
        Command::Image(ImageCommand::Plan {
            spec,
            agent_deb,
            json,
        }) => {
            let plan = build::plan(
                &BuildOptions {
                    spec,
                    out: None,
                    agent_deb,
                    force: false,
                    no_cache: false,
                    registry: None,
                },
                &mut ui,
            )?;
            output(json, &plan, || plan.human(), true)
        }
        Command::Image(ImageCommand::List { name, json }) => {
            let versions = inventory::list(&open()?, name.as_deref())?;
            output(json, &versions, || inventory::list_human(&versions), true)
        }
        Command::Image(ImageCommand::Show { reference, json }) => {
            let show = inventory::show(&open()?, &reference)?;
            output(json, &show, || show.human(), true)
        }
        Command::Image(ImageCommand::Diff { from, to, json }) => {
            let diff = inventory::diff(&open()?, &from, &to)?;
            output(json, &diff, || diff.human(), true)
        }
        Command::Image(ImageCommand::Verify { reference, json }) => {
            let v = inventory::verify(&open()?, &reference)?;
            output(json, &v, || v.human(), v.ok)
        }
        Command::Image(ImageCommand::Gc { keep, name, json }) => {
            let gc = inventory::gc(&mut open()?, name.as_deref(), keep)?;
            output(json, &gc, || gc.human(), true)
        }
        Command::Image(ImageCommand::Test { target, vm, json }) => {
            let target = boottest::resolve_target(&target, &registry_path)?;
            let report = run_test(&target, &vm, &registry_path)?;
            output(json, &report, || report.summary(), report.passed)
        }
        Command::Image(ImageCommand::Boot {
            target,
            ssh_port,
            memory,
            cpus,
        }) => {
            let target = boottest::resolve_target(&target, &registry_path)?;
            boottest::boot(&target, memory, cpus, ssh_port)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn publish_command(
    cmd: PublishCommand,
    reg: &mut Registry,
    settings: &crate::model::settings::Settings,
    ui: &Ui,
) -> Result<ExitCode> {
    let aws = |a: AwsArgs| publish::aws_options(settings, a.profile, a.endpoint_url);
    match cmd {
        PublishCommand::Ami {
            reference,
            region,
            copy_to,
            name,
            force,
            aws: a,
            json,
        } => {
            let req = publish::AmiRequest {
                reference,
                region: region.or_else(|| settings.aws.region.clone()),
                copy_to,
                name,
                force,
            };
            let p = publish::ami(reg, settings, &aws(a), &req, ui)?;
            output(json, &p, || p.human(), true)
        }
        PublishCommand::Promote {
            reference,
            region,
            aws: a,
            json,
        } => {
            let p = publish::promote(reg, settings, &aws(a), &reference, &region)?;
            output(
                json,
                &p,
                || {
                    p.regions
                        .iter()
                        .map(|(r, id)| format!("{r}: {} = {id}\n", p.parameter))
                        .collect()
                },
                true,
            )
        }
        PublishCommand::Packer {
            reference,
            region,
            no_communicator,
            vars,
            force,
            aws: a,
            json,
        } => {
            let opts = packer_options(settings, region, a, !no_communicator, None)?;
            let b = crate::publish::packer::build(reg, &reference, force, &opts, &vars)?;
            output(json, &b, || format!("{}: {}\n", b.region, b.ami_id), true)
        }
        PublishCommand::List { name, json } => {
            let pubs = reg.publications(name.as_deref(), None)?;
            output(json, &pubs, || publish::list_human(&pubs), true)
        }
        PublishCommand::Deregister {
            reference,
            force,
            aws: a,
            json,
        } => {
            let removed = publish::deregister(reg, settings, &aws(a), &reference, force)?;
            output(json, &removed, || publish::list_human(&removed), true)
        }
        PublishCommand::Verify {
            reference,
            region,
            aws: a,
            json,
        } => {
            let v = publish::verify(reg, &aws(a), &reference, &region)?;
            output(
                json,
                &v,
                || {
                    format!(
                        "{} in {} equals {} ({} blocks compared)\n",
                        v.snapshot_id,
                        v.region,
                        v.raw.display(),
                        v.blocks
                    )
                },
                true,
            )
        }
    }
}

/// Packer talks to AWS itself: it gets the region and an explicit endpoint (flag,
/// settings, or the SDK's AWS_ENDPOINT_URL[_EC2], which Packer does not read).
fn packer_options(
    settings: &crate::model::settings::Settings,
    region: Option<String>,
    aws: AwsArgs,
    ssh: bool,
    out: Option<PathBuf>,
) -> Result<crate::publish::packer::RenderOptions> {
    let opts = publish::aws_options(settings, aws.profile, aws.endpoint_url);
    let region = region
        .or(opts.region)
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .context("no AWS region is set\n  hint: pass --region, set AWS_REGION, or set `[aws] region` in the settings file")?;
    let endpoint = opts
        .endpoint_url
        .or_else(|| std::env::var("AWS_ENDPOINT_URL_EC2").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
    Ok(crate::publish::packer::RenderOptions {
        region,
        endpoint,
        ssh,
        out,
    })
}

/// Boot-test, write JUnit if asked, and record the run in the registry.
fn run_test(
    target: &boottest::Target,
    vm: &VmArgs,
    registry_path: &std::path::Path,
) -> Result<boottest::TestReport> {
    let report = boottest::test(target, &vm.options())?;
    if let Some(path) = &vm.junit {
        std::fs::write(path, report.junit())
            .with_context(|| format!("cannot write the JUnit report {}", path.display()))?;
    }
    record_test(registry_path, target, &report)?;
    Ok(report)
}

/// Store a boot-test run with its version (images without a manifest are not in the
/// registry and are not recorded).
fn record_test(
    registry_path: &std::path::Path,
    target: &boottest::Target,
    report: &boottest::TestReport,
) -> Result<()> {
    let Some(m) = &target.manifest else {
        return Ok(());
    };
    let run = TestRun {
        started_at: crate::support::time::now(),
        passed: report.passed,
        accelerator: format!("{:?}", report.accel.accel).to_lowercase(),
        seconds: report.seconds,
    };
    Registry::open(registry_path)?.record_test(
        &m.name,
        &m.version,
        &run,
        &serde_json::to_value(report)?,
    )
}

/// Results to stdout: JSON with `--json`, else the human text; the exit code says
/// whether what was checked is good.
fn fleet_command(
    cmd: FleetCommand,
    reg: &mut Registry,
    settings: &crate::model::settings::Settings,
) -> Result<ExitCode> {
    use crate::fleet;
    let target = |s: StackArgs, c: Option<&ChangeArgs>| {
        let opts = publish::aws_options(settings, s.aws.profile, s.aws.endpoint_url);
        let t = fleet::Target {
            stack: s.name,
            region: s.region.or_else(|| settings.aws.region.clone()),
            bake: Duration::from_secs(c.map_or(0, |c| c.bake)),
            dry_run: c.is_some_and(|c| c.dry_run),
        };
        (opts, t)
    };
    match cmd {
        FleetCommand::Render { .. } => unreachable!("handled in run"),
        FleetCommand::Deploy {
            stack,
            template,
            image,
            params,
            change,
        } => {
            let (opts, t) = target(stack, Some(&change));
            let req = fleet::DeployRequest {
                template,
                image,
                params,
            };
            let o = fleet::deploy(reg, &opts, &t, &req)?;
            output(change.json, &o, || o.human(), o.ok())
        }
        FleetCommand::Rollout {
            stack,
            to,
            canary_stack,
            change,
        } => {
            let (opts, t) = target(stack, Some(&change));
            let all = fleet::rollout(reg, &opts, &t, &to, canary_stack.as_deref())?;
            let ok = all.iter().all(fleet::Outcome::ok);
            output(
                change.json,
                &all,
                || all.iter().map(fleet::Outcome::human).collect(),
                ok,
            )
        }
        FleetCommand::Rollback { stack, to, change } => {
            let (opts, t) = target(stack, Some(&change));
            let o = fleet::rollback(reg, &opts, &t, to.as_deref())?;
            output(change.json, &o, || o.human(), o.ok())
        }
        FleetCommand::Status { stack, json } => {
            let (opts, t) = target(stack, None);
            let s = fleet::status(reg, &opts, &t)?;
            output(json, &s, || s.human(), true)
        }
        FleetCommand::History {
            stack,
            region,
            json,
        } => {
            let rows = reg.rollouts(stack.as_deref(), region.as_deref())?;
            output(json, &rows, || fleet::history_human(&rows), true)
        }
    }
}

fn output(
    json: bool,
    value: &impl serde::Serialize,
    human: impl FnOnce() -> String,
    ok: bool,
) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", human());
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Logs go to stderr. On a terminal only warnings show (the spinner says what runs);
/// in CI logs every external command line is shown.
fn init_logging(verbose: bool, ui: &Ui) {
    let default = if verbose {
        "debug"
    } else if ui.is_fancy() {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEVOS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ui.is_fancy())
        .without_time()
        .try_init();
}
