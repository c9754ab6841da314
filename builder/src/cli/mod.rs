//! The `devos-build` command line: clap definitions (doc comments are the help text)
//! and one function per verb.

mod args;
pub(crate) mod doctor;

pub use args::Cli;
use args::{
    AwsArgs, BuildArgs, CacheCommand, ChangeArgs, Command, FleetCommand, ImageCommand,
    PackerCommand, PublishCommand, StackArgs, VmArgs,
};

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::build::{self, BuildOptions, repro};
use crate::model::spec::Format;
use crate::store::cache::{self, Cache};
use crate::store::registry::{self, Registry, TestRun};
use crate::support::ui::Ui;
use crate::{boottest, inventory, publish};

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
        Command::Doctor { json } => {
            let report = crate::cli::doctor::check();
            let ok = report.tools.iter().all(|t| t.found.is_some());
            output(json, &report, || report.human(), ok)
        }
        Command::Image(cmd) => image_command(cmd, &registry_path, &mut ui),
        Command::Relay { addr } => {
            boottest::ec2::relay(&addr)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache(cmd) => cache_command(cmd),
    }
}

/// `image ...`: build, plan, test and boot images, and the registry's commands.
fn image_command(cmd: ImageCommand, registry_path: &Path, ui: &mut Ui) -> Result<ExitCode> {
    let open = || Registry::open(registry_path);
    match cmd {
        ImageCommand::Export {
            reference,
            format,
            out,
            json,
        } => export_command(registry_path, &reference, &format, out.as_deref(), json),
        ImageCommand::Build(args) => build_command(args, registry_path, ui),
        ImageCommand::Validate { spec, json } => validate_command(&spec, json),
        ImageCommand::Plan {
            spec,
            agent_deb,
            json,
        } => plan_command(spec, agent_deb, json, ui),
        ImageCommand::List { name, json } => {
            let versions = inventory::list(&open()?, name.as_deref())?;
            output(json, &versions, || inventory::list_human(&versions), true)
        }
        ImageCommand::Show { reference, json } => {
            let show = inventory::show(&open()?, &reference)?;
            output(json, &show, || show.human(), true)
        }
        ImageCommand::Diff { from, to, json } => {
            let diff = inventory::diff(&open()?, &from, &to)?;
            output(json, &diff, || diff.human(), true)
        }
        ImageCommand::Verify { reference, json } => {
            let v = inventory::verify(&open()?, &reference)?;
            output(json, &v, || v.human(), v.ok)
        }
        ImageCommand::Gc {
            keep,
            name,
            dry_run,
            json,
        } => {
            let gc = inventory::gc(&mut open()?, name.as_deref(), keep, dry_run)?;
            output(json, &gc, || gc.human(), true)
        }
        ImageCommand::Test { target, vm, json } => {
            let target = boottest::resolve_target(&target, registry_path)?;
            let report = run_test(&target, &vm, registry_path)?;
            output(json, &report, || report.summary(), report.passed)
        }
        ImageCommand::Boot {
            target,
            ssh_port,
            ssh_key,
            autologin,
            no_autologin,
            memory,
            cpus,
            disk_bus,
        } => {
            let target = boottest::resolve_target(&target, registry_path)?;
            let default_user = target
                .manifest
                .as_ref()
                .and_then(|m| m.users.first().cloned())
                .unwrap_or_else(|| "root".into());
            if let Some(user) = &autologin
                && !crate::model::spec::is_user_name(user)
            {
                bail!(
                    "--autologin `{user}` is not a user name\n  hint: name one of the image's [[users]], or root"
                );
            }
            let opts = boottest::BootOptions {
                memory_mib: memory,
                cpus,
                disk_bus,
                ssh_port,
                ssh_key,
                autologin: (!no_autologin).then(|| autologin.unwrap_or(default_user)),
            };
            boottest::boot(&target, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `image export`: a registered version's disk written out in another format.
fn export_command(
    registry_path: &Path,
    reference: &str,
    format: &str,
    out: Option<&Path>,
    json: bool,
) -> Result<ExitCode> {
    // clap has checked the name against the list.
    let format = <Format as clap::ValueEnum>::from_str(format, false)
        .map_err(|e| anyhow::anyhow!("--format {format}: {e}"))?;
    let mut reg = Registry::open(registry_path)?;
    let e = crate::inventory::export::export(&mut reg, reference, format, out)?;
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

/// `image build`: build (twice with --check-reproducible), boot-test if asked, report.
fn build_command(args: BuildArgs, registry_path: &Path, ui: &mut Ui) -> Result<ExitCode> {
    let opts = BuildOptions {
        spec: args.spec,
        out: args.out,
        agent_deb: args.agent_deb,
        force: args.force,
        no_cache: args.no_cache,
        registry: Some(registry_path.to_path_buf()),
    };
    let (built, repro) = if args.check_reproducible {
        let (built, report) = repro::check(&opts, ui)?;
        (built, Some(report))
    } else {
        (build::build(&opts, ui)?, None)
    };
    let report = if args.test {
        Some(test_built(&built, &opts.spec, &args.vm, registry_path, ui)?)
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
    let ok = report.as_ref().is_none_or(|r| r.passed) && repro.as_ref().is_none_or(|r| r.identical);
    let human = || built_human(&built, repro.as_ref(), report.as_ref());
    output(args.json, &value, human, ok)
}

/// Boot-test a fresh build with the tests of its spec, and record the run.
fn test_built(
    built: &build::Built,
    spec: &Path,
    vm: &VmArgs,
    registry_path: &Path,
    ui: &Ui,
) -> Result<boottest::TestReport> {
    let spec = crate::model::spec::load(spec)?;
    let target = boottest::Target::from_dir(&built.dir, Some(&spec))?;
    ui.info("==> boot test");
    run_test(&target, vm, registry_path)
}

/// What `image build` prints: version, output, artifacts, then the checks' summaries.
fn built_human(
    built: &build::Built,
    repro: Option<&repro::Report>,
    report: Option<&boottest::TestReport>,
) -> String {
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
    if let Some(r) = repro {
        s.push_str(&r.human());
    }
    if let Some(r) = report {
        s.push_str(&r.summary());
    }
    s
}

/// `image plan`: the build id and every input to it, without building.
/// `image validate`: the spec loaded and checked, nothing fetched or written.
fn validate_command(path: &Path, json: bool) -> Result<ExitCode> {
    let spec = crate::model::spec::load(path)?;
    spec.check_buildable()?;
    let report = serde_json::json!({ "valid": true, "spec": spec });
    output(
        json,
        &report,
        || {
            format!(
                "{}: valid — {} {} ({} {}), {} packages from {} layer(s), {} MiB disk, {}\n",
                path.display(),
                spec.name,
                spec.version,
                spec.distro.name(),
                spec.suite,
                spec.all_packages().len(),
                spec.layers.len(),
                spec.disk_size >> 20,
                spec.formats
                    .iter()
                    .map(|f| f.extension())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        true,
    )
}

fn plan_command(
    spec: PathBuf,
    agent_deb: Option<PathBuf>,
    json: bool,
    ui: &mut Ui,
) -> Result<ExitCode> {
    let plan = build::plan(
        &BuildOptions {
            spec,
            out: None,
            agent_deb,
            force: false,
            no_cache: false,
            registry: None,
        },
        ui,
    )?;
    output(json, &plan, || plan.human(), true)
}

/// `cache status` and `cache prune`.
fn cache_command(cmd: CacheCommand) -> Result<ExitCode> {
    match cmd {
        CacheCommand::Status { json } => {
            let status = Cache::new(cache::dir(), true).status()?;
            output(json, &status, || status.human(), true)
        }
        CacheCommand::Prune {
            keep,
            all,
            dry_run,
            json,
        } => {
            let pruned = Cache::new(cache::dir(), true).prune(keep, all, dry_run)?;
            output(
                json,
                &pruned,
                || {
                    let list: String = pruned.removed.iter().map(|r| format!("  {r}\n")).collect();
                    format!(
                        "{list}{} {} stage entries{}, {} {}\n",
                        if dry_run { "would remove" } else { "removed" },
                        pruned.entries,
                        if all { " and the package caches" } else { "" },
                        if dry_run { "freeing" } else { "freed" },
                        cache::mib(pruned.bytes)
                    )
                },
                true,
            )
        }
    }
}

/// `publish ...`: AMIs uploaded, copied, promoted, listed, deregistered and verified.
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
            output(json, &p, || promoted_human(&p), true)
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
            output(json, &v, || verified_human(&v), true)
        }
    }
}

/// What `publish promote` prints: the parameter's new value in each region.
fn promoted_human(p: &publish::Promoted) -> String {
    p.regions
        .iter()
        .map(|(r, id)| format!("{r}: {} = {id}\n", p.parameter))
        .collect()
}

/// What `publish verify` prints: which snapshot matched which raw image.
fn verified_human(v: &publish::Verified) -> String {
    format!(
        "{} in {} equals {} ({} blocks compared)\n",
        v.snapshot_id,
        v.region,
        v.raw.display(),
        v.blocks
    )
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
    // `.ok()`: a variable that is unset (or not UTF-8, which no region or URL is) is
    // not given, as the AWS SDK reads it.
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
        accelerator: report.accel.accel.as_str().to_owned(),
        seconds: report.seconds,
    };
    Registry::open(registry_path)?.record_test(
        &m.name,
        &m.version,
        &run,
        &serde_json::to_value(report)?,
    )
}

/// `fleet ...` but `render` (no AWS): deploy, roll out, roll back, status, history.
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

/// Results to stdout: JSON with `--json`, else the human text; the exit code says
/// whether what was checked is good.
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
    // Fails only when a subscriber is already set (`run` called twice in one
    // process): logging then goes there.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ui.is_fancy())
        .without_time()
        .try_init();
}
