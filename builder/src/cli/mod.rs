//! The `devos-build` command line: clap definitions (doc comments are the help text)
//! and one function per verb.

mod args;
pub(crate) mod doctor;

pub use args::Cli;
use args::{
    AwsArgs, BuildArgs, CacheCommand, ChangeArgs, Command, FleetCommand, ImageCommand, KeysCommand,
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
use crate::support::Usage;
use crate::support::dry_run::DryRun;
use crate::support::stdout;
use crate::support::ui::Ui;
use crate::{boottest, inventory, publish};

pub fn run(cli: Cli) -> Result<ExitCode> {
    let mut ui = Ui::new();
    init_logging(cli.verbose, &ui);
    // `DEVOS_REGISTRY=` (empty) means the default, as if unset.
    let named_registry = cli.registry.clone().filter(|p| !p.as_os_str().is_empty());
    let named = named_registry.is_some();
    let registry_path = named_registry.unwrap_or_else(registry::default_path);
    let open = || open_registry(&registry_path, named);
    let read = || read_registry(&registry_path, named);
    // `DEVOS_CONFIG=` (empty) means the default too.
    let config = cli.config.clone().filter(|p| !p.as_os_str().is_empty());
    let settings = || crate::model::settings::load(config.as_deref());
    match cli.command {
        Command::Publish(cmd) => {
            // Listing and dry runs read; they never create or migrate the registry.
            let reads = matches!(
                cmd,
                PublishCommand::List { .. }
                    | PublishCommand::Updates { dry_run: true, .. }
                    | PublishCommand::Ami { dry_run: true, .. }
                    | PublishCommand::Promote { dry_run: true, .. }
                    | PublishCommand::Packer { dry_run: true, .. }
                    | PublishCommand::Deregister { dry_run: true, .. }
            );
            let mut reg = if reads { read()? } else { open()? };
            publish_command(cmd, &mut reg, &settings()?, &ui)
        }
        Command::Fleet(FleetCommand::Render {
            template,
            image,
            region,
            out,
        }) => {
            // A WorkSpaces bundle is made in the account's region of its directory:
            // the template names none.
            let region = match (template, region) {
                (crate::fleet::Template::Workspaces, None) => String::new(),
                (_, region) => publish::region(region, &settings()?)?,
            };
            let yaml = crate::fleet::render(&read()?, template, &image, &region)?;
            match out {
                Some(path) => std::fs::write(&path, yaml)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => stdout::print(yaml)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fleet(cmd) => {
            let reads = match &cmd {
                FleetCommand::Status { .. } | FleetCommand::History { .. } => true,
                FleetCommand::Deploy { change, .. }
                | FleetCommand::Rollout { change, .. }
                | FleetCommand::Rollback { change, .. } => change.dry_run,
                FleetCommand::Unmark { dry_run, .. } => *dry_run,
                _ => false,
            };
            let mut reg = if reads { read()? } else { open()? };
            fleet_command(cmd, &mut reg, &settings()?)
        }
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
            let r = crate::publish::packer::render(&read()?, &reference, &opts)?;
            output(
                json,
                &r,
                || format!("{} (packer validate: ok)\n", r.template.display()),
                true,
            )
        }
        Command::Keys(cmd) => keys_command(cmd),
        Command::Doctor { json } => {
            let report = crate::cli::doctor::check();
            output(json, &report, || report.human(), report.ok)
        }
        Command::Image(cmd) => image_command(cmd, &registry_path, named, &mut ui),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "devos-build", &mut script);
            stdout::print(script)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { command } => {
            stdout::print(man_page(&command)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Relay { addr } => {
            boottest::ec2::relay(&addr)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache(cmd) => cache_command(cmd),
    }
}

/// Open the registry for a command that writes it. Only `image build` makes a new
/// one: one the user named (`--registry`, `DEVOS_REGISTRY`) that is not there is a
/// typo, refused as [`read_registry`] refuses it, never made at that path.
fn open_registry(path: &Path, named: bool) -> Result<Registry> {
    if named && !path.exists() {
        return read_registry(path, named);
    }
    Registry::open(path)
}

/// Open the registry for a command that only reads it: never created. One the user
/// named (`named`: `--registry` or `DEVOS_REGISTRY`) must exist, as a typo in its path
/// would otherwise read as a registry with no images.
fn read_registry(path: &Path, named: bool) -> Result<Registry> {
    if named && !path.exists() {
        bail!(
            "the registry {} does not exist\n  hint: check the path given with --registry or DEVOS_REGISTRY; `devos-build image build` creates the registry",
            path.display()
        );
    }
    Registry::open_read(path)
}

/// `image ...`: build, plan, test and boot images, and the registry's commands.
fn image_command(
    cmd: ImageCommand,
    registry_path: &Path,
    named: bool,
    ui: &mut Ui,
) -> Result<ExitCode> {
    let open = || open_registry(registry_path, named);
    let read = || read_registry(registry_path, named);
    match cmd {
        ImageCommand::Export {
            reference,
            format,
            out,
            dry_run,
            json,
        } => export_command(
            if dry_run { read()? } else { open()? },
            &reference,
            &format,
            out.as_deref(),
            dry_run,
            json,
        ),
        ImageCommand::Build(args) => build_command(args, registry_path, ui),
        ImageCommand::Validate { spec, json } => validate_command(&spec, json),
        ImageCommand::Plan {
            spec,
            agent_deb,
            json,
        } => plan_command(spec, agent_deb, json, ui),
        ImageCommand::List { name, json } => {
            let versions = inventory::list(&read()?, name.as_deref())?;
            output(json, &versions, || inventory::list_human(&versions), true)
        }
        ImageCommand::Show { reference, json } => {
            let show = inventory::show(&read()?, &reference)?;
            output(json, &show, || show.human(), true)
        }
        ImageCommand::Diff { from, to, json } => {
            let diff = inventory::diff(&read()?, &from, &to)?;
            output(json, &diff, || diff.human(), true)
        }
        ImageCommand::Verify { reference, json } => {
            let v = inventory::verify(&read()?, &reference)?;
            output(json, &v, || v.human(), v.ok)
        }
        ImageCommand::Gc {
            keep,
            name,
            dry_run,
            json,
        } => {
            // (A registry named that is not there is a typo: refused by both.)
            let mut reg = if dry_run { read()? } else { open()? };
            let gc = inventory::gc(&mut reg, name.as_deref(), keep, dry_run)?;
            let nothing = dry_run && gc.removed.is_empty() && gc.cache_entries_removed == 0;
            nothing_to_do(output(json, &gc, || gc.human(), true), nothing)
        }
        ImageCommand::Test {
            target,
            vm,
            update_to,
            json,
        } => {
            check_junit(&vm)?;
            let target = boottest::resolve_target(&target, registry_path)?;
            let mut opts = vm.options();
            if let Some(to) = update_to {
                let version = Registry::open_read(registry_path)?.find(&to)?;
                let to = boottest::update::UpdateTo {
                    manifest: crate::model::manifest::Manifest::load(&version.dir)?,
                    dir: version.dir,
                };
                to.check_from(&target)?;
                opts.update_to = Some(to);
            }
            let (report, recorded) = run_test(&target, &opts, registry_path)?;
            let code = output(json, &report, || report.summary(), report.passed)?;
            both(recorded, write_junit(&vm, &report))?;
            Ok(code)
        }
        ImageCommand::Boot {
            target,
            ssh_port,
            ssh_key,
            autologin,
            no_autologin,
            machine,
        } => {
            // The arguments first: nothing is looked up, probed or announced for a
            // command that cannot run.
            if let Some(user) = &autologin
                && !crate::model::spec::is_user_name(user)
            {
                bail!(
                    "--autologin `{user}` is not a user name\n  hint: name one of the image's [[users]], or root"
                );
            }
            let ssh_key = match ssh_port {
                Some(_) => boottest::ssh_public_key(ssh_key.as_deref())?,
                None => None,
            };
            let target = boottest::resolve_target(&target, registry_path)?;
            let default_user = target
                .manifest
                .as_ref()
                .and_then(|m| m.users.first().cloned())
                .unwrap_or_else(|| "root".into());
            let opts = boottest::BootOptions {
                memory_mib: machine.memory,
                cpus: machine.cpus,
                disk_bus: machine.disk_bus,
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
    mut reg: Registry,
    reference: &str,
    format: &str,
    out: Option<&Path>,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode> {
    // clap has checked the name against the list.
    let format = <Format as clap::ValueEnum>::from_str(format, false)
        .map_err(|e| anyhow::anyhow!("--format {format}: {e}"))?;
    if dry_run {
        let dry = crate::inventory::export::dry_run(&reg, reference, format, out)?;
        return dry_run_output(json, &dry);
    }
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
        // `dist/x/.` and `link/` as the directory itself (the output replaces it by name).
        out: args
            .out
            .map(|o| std::path::absolute(&o).map(|o| o.components().collect()))
            .transpose()
            .context("cannot resolve --out")?,
        agent_deb: args.agent_deb,
        force: args.force,
        no_cache: args.no_cache,
        registry: Some(registry_path.to_path_buf()),
    };
    if args.dry_run {
        // What the real run would refuse at once (root, --out's directory, the keys),
        // before resolving anything.
        build::check_dry_run(&opts, &crate::model::spec::load(&opts.spec)?)?;
        let plan = build::plan(&opts, ui)?;
        // Nothing to do only when the real run would change nothing: the version is
        // built and recorded (clap refuses --dry-run with --force, --test,
        // --check-reproducible and --no-cache).
        // Recorded as it is there (a rebuild killed before it was recorded is not).
        let recorded = plan.version.as_ref().is_some_and(|v| {
            let on_disk = crate::model::manifest::Manifest::load(&plan.out);
            Registry::open_read(registry_path).is_ok_and(|r| {
                r.find(&format!("{}@{v}", plan.name))
                    .is_ok_and(|row| on_disk.is_ok_and(|m| build::records(&row, &plan.out, &m)))
            })
        });
        let nothing = plan.up_to_date && recorded;
        return nothing_to_do(output(args.json, &plan, || plan.human(), true), nothing);
    }
    // clap refuses --junit without --test.
    check_junit(&args.vm)?;
    let (built, repro) = if args.check_reproducible {
        let (built, report) = repro::check(&opts, ui)?;
        (built, Some(report))
    } else {
        (build::build(&opts, ui)?, None)
    };
    let (report, recorded) = if args.test {
        let (report, recorded) = test_built(&built, &opts.spec, &args.vm, registry_path, ui)?;
        (Some(report), recorded)
    } else {
        (None, Ok(()))
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
    let code = output(args.json, &value, human, ok)?;
    let junit = match &report {
        Some(report) => write_junit(&args.vm, report),
        None => Ok(()),
    };
    both(recorded, junit)?;
    Ok(code)
}

/// A test's recording and its JUnit report, each of which may have failed: both
/// failures are said.
fn both(recorded: Result<()>, junit: Result<()>) -> Result<()> {
    match (recorded, junit) {
        (Err(r), Err(j)) => Err(anyhow::anyhow!(
            "{r:#}\nerror: and the JUnit report was not written: {j:#}"
        )),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// Boot-test a fresh build with the tests of its spec, and record the run.
fn test_built(
    built: &build::Built,
    spec: &Path,
    vm: &VmArgs,
    registry_path: &Path,
    ui: &Ui,
) -> Result<(boottest::TestReport, Result<()>)> {
    let spec = crate::model::spec::load(spec)?;
    let target = boottest::Target::from_dir(&built.dir, Some(&spec))?;
    ui.info("==> boot test");
    run_test(&target, &vm.options(), registry_path)
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
    let m = &built.manifest;
    if !m.update.is_empty() {
        let what = match m.update_feed {
            Some(_) => "the bundle `publish updates` puts in a feed",
            None => "the version's slot images; no feed takes them: the spec has no `[update]`",
        };
        s.push_str(&format!("  update/ ({} files: {what})\n", m.update.len()));
    }
    if let Some(u) = &m.update_feed {
        s.push_str(&format!("  updates {}\n", u.describe()));
    }
    if let Some(sb) = &m.secure_boot {
        s.push_str(&format!("  Secure Boot: {}\n", sb.describe()));
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
    let checked = crate::model::spec::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|spec| {
            spec.check_buildable()?;
            crate::image::check_spec(&spec)?;
            Ok(spec)
        });
    let spec = match checked {
        Ok(spec) => spec,
        // A script reading `--json` gets an answer either way (the error also goes
        // to stderr, and the exit code is 1).
        Err(e) if json => {
            let report = serde_json::json!({ "valid": false, "error": format!("{e:#}") });
            stdout::print(serde_json::to_string_pretty(&report)? + "\n")?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    // Warnings go to stderr in both forms; JSON also carries them.
    for w in &spec.warnings {
        eprintln!("warning: {w}");
    }
    let report = serde_json::json!({ "valid": true, "warnings": spec.warnings, "spec": spec });
    output(
        json,
        &report,
        || {
            format!(
                "{}: valid{} — {} {} ({} {}), {} packages from {} layer(s), {} MiB disk, {}\n",
                path.display(),
                match spec.warnings.len() {
                    0 => String::new(),
                    1 => " with 1 warning".to_owned(),
                    n => format!(" with {n} warnings"),
                },
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
            let nothing = dry_run && pruned.removed.is_empty();
            let code = output(
                json,
                &pruned,
                || {
                    let list: String = pruned.removed.iter().map(|r| format!("  {r}\n")).collect();
                    format!(
                        "{list}{} {} stage entries{}, {} {}\n",
                        if dry_run { "would remove" } else { "removed" },
                        pruned.entries_removed,
                        if all { " and the package caches" } else { "" },
                        if dry_run { "freeing" } else { "freed" },
                        cache::mib(pruned.freed_bytes)
                    )
                },
                true,
            );
            nothing_to_do(code, nothing)
        }
    }
}

/// `keys generate|show|export`: the builder's update signing key and Secure Boot key.
fn keys_command(cmd: KeysCommand) -> Result<ExitCode> {
    use crate::update::{boot_key, keys};
    let dir = keys::dir();
    let (key, boot, export, json) = match cmd {
        KeysCommand::Generate {
            export,
            dry_run: true,
            json,
        } => {
            // Refused as the real run is: there is never nothing to do.
            keys::check_existing_dir(&dir)?;
            let (key, boot) = keys::not_both(&dir)?;
            let mut dry = DryRun::new();
            if key.is_none() {
                dry.would(format!("make an Ed25519 signing key in {}", dir.display()));
            }
            if boot.is_none() {
                dry.would(format!(
                    "make an RSA-2048 Secure Boot key and certificate in {}",
                    dir.display()
                ));
            }
            if let Some(file) = export {
                keys::check_export_destination(&file, key.as_ref())?;
                dry.would(format!("write its public key to {}", file.display()));
            }
            return dry_run_output(json, &dry);
        }
        KeysCommand::Generate { export, json, .. } => {
            // Checked first: a key made and then not exported could not be made again.
            if let Some(file) = &export {
                keys::check_export_destination(file, keys::find(&dir)?.as_ref())?;
            }
            let (key, boot) = keys::generate(&dir)?;
            (key, Some(boot), export, json)
        }
        KeysCommand::Show { json } => (keys::current(&dir)?, boot_key::checked(&dir)?, None, json),
        KeysCommand::Export {
            file,
            dry_run: true,
            json,
        } => {
            let key = keys::current(&dir)?;
            keys::check_export_destination(&file, Some(&key))?;
            let mut dry = DryRun::new();
            if holds_public_key(&key, &file)? {
                dry.note = Some(format!(
                    "{} already holds the public key {}",
                    file.display(),
                    key.fingerprint
                ));
            } else {
                dry.would(format!(
                    "write the public key {} to {}",
                    key.fingerprint,
                    file.display()
                ));
            }
            return dry_run_output(json, &dry);
        }
        KeysCommand::Export { file, json, .. } => {
            let key = keys::current(&dir)?;
            keys::check_export_destination(&file, Some(&key))?;
            (key, None, Some(file), json)
        }
    };
    // A file that already holds exactly this public key is left as it is.
    let mut unchanged = false;
    if let Some(file) = &export {
        unchanged = holds_public_key(&key, file)?;
        if !unchanged {
            write_public_key(&key, file)?;
        }
    }
    let shown = KeyOutput {
        key: &key,
        secure_boot: boot.as_ref(),
        exported_to: export.as_deref(),
        unchanged,
    };
    output(json, &shown, || shown.human(), true)
}

/// `keys show|generate|export`: the keys, and where the public key was written.
#[derive(serde::Serialize)]
struct KeyOutput<'a> {
    #[serde(flatten)]
    key: &'a crate::update::keys::KeyInfo,
    /// The Secure Boot certificate (`keys show` and `generate`; none made yet: absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    secure_boot: Option<&'a crate::update::boot_key::Certificate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exported_to: Option<&'a Path>,
    /// `exported_to` already held this public key, byte for byte: it was not rewritten.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    unchanged: bool,
}

impl KeyOutput<'_> {
    fn human(&self) -> String {
        let mut text = self.key.human();
        match (self.secure_boot, self.exported_to) {
            (Some(boot), _) => text.push_str(&boot.human()),
            (None, None) => text.push_str(
                "secure boot: no key yet (`devos-build keys generate` makes it, for `[disk] secure-boot`)\n",
            ),
            (None, Some(_)) => {}
        }
        if let Some(file) = self.exported_to {
            let what = if self.unchanged {
                "already in:"
            } else {
                "written to:"
            };
            text.push_str(&format!("{what}  {}\n", file.display()));
        }
        text
    }
}

/// Whether `file` holds exactly the public key `key` exports (byte for byte).
fn holds_public_key(key: &crate::update::keys::KeyInfo, file: &Path) -> Result<bool> {
    let Ok(held) = std::fs::read(file) else {
        return Ok(false);
    };
    Ok(held == crate::update::keys::export(key)?)
}

/// The public key of `key` into `file`, whole or not at all.
fn write_public_key(key: &crate::update::keys::KeyInfo, file: &Path) -> Result<()> {
    let public = crate::update::keys::export(key)?;
    crate::support::paths::replace_file(file, &mut public.as_slice(), 0o644)
        .with_context(|| format!("cannot write the public key to {}", file.display()))
}

/// `publish ...`: AMIs uploaded, copied, promoted, listed, deregistered and verified.
fn publish_command(
    cmd: PublishCommand,
    reg: &mut Registry,
    settings: &crate::model::settings::Settings,
    ui: &Ui,
) -> Result<ExitCode> {
    let aws = |region: Option<String>, a: AwsArgs| {
        publish::aws_options(settings, region, a.profile, a.endpoint_url)
    };
    match cmd {
        PublishCommand::Updates {
            reference,
            to,
            force,
            region,
            aws: a,
            dry_run,
            json,
        } => {
            use crate::publish::updates;
            // The registry, the version and the key first: AWS only for what is left.
            let prepared = updates::prepare(reg, &reference, &to, force)?;
            let feed = updates::open_feed(&to, || aws(region, a))?;
            if dry_run {
                return dry_run_output(json, &updates::publish_dry_run(reg, &prepared, &*feed)?);
            }
            let p = updates::publish_feed(reg, &prepared, &*feed)?;
            output(json, &p, || p.human(), true)
        }
        PublishCommand::Ami {
            reference,
            region,
            copy_to,
            name,
            force,
            aws: a,
            dry_run,
            json,
        } => {
            let req = publish::AmiRequest {
                reference,
                region: region.or_else(|| settings.aws.region()),
                copy_to,
                name,
                force,
            };
            if dry_run {
                return dry_run_output(json, &publish::ami_dry_run(reg, settings, &req)?);
            }
            let p = publish::ami(reg, settings, &aws(req.region.clone(), a), &req, ui)?;
            output(json, &p, || p.human(), true)
        }
        PublishCommand::Promote {
            reference,
            region,
            aws: a,
            dry_run,
            json,
        } => {
            let opts = aws(region.first().cloned(), a);
            if dry_run {
                let dry = publish::promote_dry_run(reg, settings, &opts, &reference, &region)?;
                return dry_run_output(json, &dry);
            }
            let p = publish::promote(reg, settings, &opts, &reference, &region)?;
            output(json, &p, || promoted_human(&p), true)
        }
        PublishCommand::Packer {
            reference,
            region,
            no_communicator,
            vars,
            force,
            aws: a,
            dry_run,
            json,
        } => {
            let opts = packer_options(settings, region, a, !no_communicator, None)?;
            if dry_run {
                let dry = crate::publish::packer::dry_run(reg, &reference, force, &opts)?;
                return dry_run_output(json, &dry);
            }
            let b = crate::publish::packer::build(reg, &reference, force, &opts, &vars)?;
            output(json, &b, || format!("{}: {}\n", b.region, b.ami_id), true)
        }
        PublishCommand::List { name, json } => {
            // A name the registry does not know is said as `image list` says it (with
            // the names it knows), not as an image that was never published.
            if let Some(name) = &name {
                inventory::list(reg, Some(name))?;
            }
            let pubs = reg.publications(name.as_deref(), None)?;
            output(json, &pubs, || publish::list_human(&pubs), true)
        }
        PublishCommand::Deregister {
            reference,
            force,
            aws: a,
            dry_run,
            json,
        } => {
            let opts = aws(None, a);
            if dry_run {
                let dry = publish::deregister_dry_run(reg, settings, &opts, &reference, force)?;
                return dry_run_output(json, &dry);
            }
            let removed = publish::deregister(reg, settings, &opts, &reference, force)?;
            output(json, &removed, || publish::list_human(&removed), true)
        }
        PublishCommand::Verify {
            reference,
            region,
            aws: a,
            json,
        } => {
            let region = publish::region(region, settings)?;
            let v = publish::verify(reg, &aws(Some(region.clone()), a), &reference, &region)?;
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
    let region = publish::region(region, settings)?;
    let opts = publish::aws_options(
        settings,
        Some(region.clone()),
        aws.profile,
        aws.endpoint_url,
    );
    devos_aws::check_endpoints(&opts)?;
    // `.ok()`: a variable that is unset (or not UTF-8, which no URL is) is not given,
    // as the AWS SDK reads it.
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

/// Boot-test and record the run in the registry (an update test is neither version's
/// boot test and is not recorded). The caller checks `--junit` before anything
/// ([`check_junit`]) and writes it with [`write_junit`] once the result is printed, so
/// a failure to write it loses no result.
fn run_test(
    target: &boottest::Target,
    opts: &boottest::TestOptions,
    registry_path: &std::path::Path,
) -> Result<(boottest::TestReport, Result<()>)> {
    let report = boottest::test(target, opts)?;
    // A run that cannot be recorded still has its report printed and written first.
    let recorded = match opts.update_to {
        None => record_test(registry_path, target, &report),
        Some(_) => Ok(()),
    };
    Ok((report, recorded))
}

/// `--junit`: that the file can be written, before minutes of building or booting.
fn check_junit(vm: &VmArgs) -> Result<()> {
    match &vm.junit {
        Some(path) => boottest::junit::check_writable(path),
        None => Ok(()),
    }
}

/// `--junit`: write the report, after it is recorded and printed.
fn write_junit(vm: &VmArgs, report: &boottest::TestReport) -> Result<()> {
    match &vm.junit {
        Some(path) => boottest::junit::write(path, report),
        None => Ok(()),
    }
}

/// Store a boot-test run with its version (images without a manifest are not in the
/// registry and are not recorded). The disk is hashed after the run: the registry
/// takes the run only if those are the bytes it holds for the version. A version the
/// registry does not hold (or no registry at that path: none is made for it) is said,
/// and the test's own result stands.
fn record_test(
    registry_path: &std::path::Path,
    target: &boottest::Target,
    report: &boottest::TestReport,
) -> Result<()> {
    let Some(m) = &target.manifest else {
        return Ok(());
    };
    let unknown = || {
        eprintln!(
            "note: {}@{} is not in the registry {}: the result is not recorded (`devos-build image build` records a version, or give --registry)",
            m.name,
            m.version,
            registry_path.display()
        );
    };
    if crate::store::registry::holds_nothing(registry_path) {
        unknown();
        return Ok(());
    }
    let file = target
        .disk
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sha256 = crate::support::digest::file_sha256(&target.disk)
        .with_context(|| format!("cannot read {}", target.disk.display()))?;
    let run = TestRun {
        started_at: crate::support::time::now(),
        passed: report.passed,
        accelerator: report.accel.accel.as_str().to_owned(),
        seconds: report.seconds,
        raw_sha256: None,
        failure: None,
    };
    let recorded = Registry::open(registry_path)?.record_test(
        &m.name,
        &m.version,
        &run,
        &crate::store::registry::Booted {
            file: &file,
            sha256: &sha256,
        },
        &serde_json::to_value(report)?,
    )?;
    if !recorded {
        unknown();
    }
    Ok(())
}

/// `fleet ...` but `render` (no AWS): deploy, roll out, roll back, status, history.
fn fleet_command(
    cmd: FleetCommand,
    reg: &mut Registry,
    settings: &crate::model::settings::Settings,
) -> Result<ExitCode> {
    use crate::fleet;
    let target = |s: StackArgs, c: Option<&ChangeArgs>| {
        let region = s.region.or_else(|| settings.aws.region());
        let opts =
            publish::aws_options(settings, region.clone(), s.aws.profile, s.aws.endpoint_url);
        let t = fleet::Target {
            stack: s.name,
            region,
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
            let nothing = change.dry_run && o.nothing_to_do();
            nothing_to_do(output(change.json, &o, || o.human(), o.ok()), nothing)
        }
        FleetCommand::Rollout {
            stack,
            to,
            in_place: true,
            batch,
            batch_timeout,
            change,
            ..
        } => {
            let (opts, t) = target(stack, Some(&change));
            let batches = fleet::Batches {
                size: batch,
                timeout: Duration::from_secs(batch_timeout),
            };
            let o = fleet::rollout_in_place(reg, &opts, &t, &to, &batches)?;
            let nothing = change.dry_run && o.nothing_to_do();
            nothing_to_do(output(change.json, &o, || o.human(), o.ok()), nothing)
        }
        FleetCommand::Rollout {
            stack,
            to,
            canary_stack,
            change,
            ..
        } => {
            let (opts, t) = target(stack, Some(&change));
            let all = fleet::rollout(reg, &opts, &t, &to, canary_stack.as_deref())?;
            let ok = all.iter().all(fleet::Outcome::ok);
            let nothing = change.dry_run && all.iter().all(fleet::Outcome::nothing_to_do);
            let code = output(
                change.json,
                &all,
                || all.iter().map(fleet::Outcome::human).collect(),
                ok,
            );
            nothing_to_do(code, nothing)
        }
        FleetCommand::Rollback { stack, to, change } => {
            let (opts, t) = target(stack, Some(&change));
            let o = fleet::rollback(reg, &opts, &t, to.as_deref())?;
            let nothing = change.dry_run && o.nothing_to_do();
            nothing_to_do(output(change.json, &o, || o.human(), o.ok()), nothing)
        }
        FleetCommand::Status { stack, json } => {
            let (opts, t) = target(stack, None);
            let s = fleet::status(reg, &opts, &t)?;
            output(json, &s, || s.human(), true)
        }
        FleetCommand::Unmark {
            stack,
            reference,
            dry_run,
            json,
        } => {
            let (opts, mut t) = target(stack, None);
            t.dry_run = dry_run;
            let u = fleet::unmark(reg, &opts, &t, &reference)?;
            output(json, &u, || u.human(), true)
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

/// The exit code of a `--dry-run` that found nothing to do. The others: 0 done, 1 an
/// error or a check that did not pass, 2 wrong usage (clap's). docs/cli.md lists them.
pub const EXIT_NOTHING_TO_DO: u8 = 3;

/// A dry run's changes to stdout; exit code 3 when there are none.
fn dry_run_output(json: bool, dry: &DryRun) -> Result<ExitCode> {
    nothing_to_do(output(json, dry, || dry.human(), true), dry.nothing_to_do())
}

/// `code`, unless a dry run found nothing to do.
fn nothing_to_do(code: Result<ExitCode>, nothing: bool) -> Result<ExitCode> {
    if nothing {
        code.map(|_| ExitCode::from(EXIT_NOTHING_TO_DO))
    } else {
        code
    }
}

/// The exit code of an error: 2 for wrong usage, 1 for everything else.
pub fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<Usage>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// The manual page of devos-build (`command` empty) or of one of its commands.
fn man_page(command: &[String]) -> Result<String> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    let mut name = vec!["devos-build".to_owned()];
    for word in command {
        let Some(sub) = cmd.find_subcommand(word).filter(|c| !c.is_hide_set()) else {
            return Err(Usage(format!(
                "`{} {word}` is not a command\n  hint: `{} --help` lists them",
                name.join(" "),
                name.join(" ")
            ))
            .into());
        };
        cmd = sub.clone();
        name.push(word.clone());
    }
    let cmd = cmd.name(name.join("-")).bin_name(name.join(" "));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    Ok(String::from_utf8(page)?)
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
        stdout::print(serde_json::to_string_pretty(value)? + "\n")?;
    } else {
        stdout::print(human())?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Crates whose own logs (the AWS SDK's credential and region chains, its HTTP
/// stack) say nothing a user can act on: their failures reach the user as errors with
/// a hint. They show with `-v` or `DEVOS_LOG`.
const QUIET_TARGETS: &[&str] = &[
    "aws_config",
    "aws_credential_types",
    "aws_runtime",
    "aws_sdk_autoscaling",
    "aws_sdk_cloudformation",
    "aws_sdk_ebs",
    "aws_sdk_ec2",
    "aws_sdk_s3",
    "aws_sdk_ssm",
    "aws_sdk_sso",
    "aws_sdk_ssooidc",
    "aws_sdk_sts",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_types",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
];

/// The log filter: `default` for devos-build, and only errors from the crates in
/// [`QUIET_TARGETS`] unless `verbose`.
fn log_filter(default: &str, verbose: bool) -> String {
    if verbose {
        return default.to_owned();
    }
    std::iter::once(default.to_owned())
        .chain(QUIET_TARGETS.iter().map(|t| format!("{t}=error")))
        .collect::<Vec<_>>()
        .join(",")
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(default, verbose)));
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::CommandFactory;

    use super::Cli;

    /// Commands that change something: each has `--dry-run`.
    const CHANGES: &[&str] = &[
        "image build",
        "image gc",
        "image export",
        "cache prune",
        "publish ami",
        "publish promote",
        "publish packer",
        "publish deregister",
        "publish updates",
        "keys generate",
        "keys export",
        "fleet deploy",
        "fleet rollout",
        "fleet rollback",
        "fleet unmark",
    ];

    /// Commands that change nothing: they read, check, run a VM on a throw-away
    /// overlay (`image test` adds its run to the registry's record, as every check
    /// does), or write only files the user asks for (`fleet render --out`, `packer
    /// render`'s directory of generated files).
    const READS: &[&str] = &[
        "image validate",
        "image plan",
        "image list",
        "image show",
        "image diff",
        "image verify",
        "image test",
        "image boot",
        "cache status",
        "publish list",
        "publish verify",
        "keys show",
        "packer render",
        "fleet render",
        "fleet status",
        "fleet history",
        "doctor",
        "completions",
        "man",
    ];

    /// Commands whose output is a document or a session, not a result to read: no
    /// `--json`.
    const NO_JSON: &[&str] = &["image boot", "fleet render", "completions", "man"];

    /// Every visible leaf command, as "image build".
    fn leaves(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
        // clap's own `help` subcommands are not commands of ours.
        for sub in cmd
            .get_subcommands()
            .filter(|c| !c.is_hide_set() && c.get_name() != "help")
        {
            let name = format!("{path} {}", sub.get_name()).trim().to_owned();
            if sub.has_subcommands() {
                leaves(sub, &name, out);
            } else {
                out.push((name, sub.clone()));
            }
        }
    }

    fn all() -> Vec<(String, clap::Command)> {
        let mut cmd = Cli::command();
        cmd.build();
        let mut out = Vec::new();
        leaves(&cmd, "", &mut out);
        out
    }

    fn has(cmd: &clap::Command, long: &str) -> bool {
        cmd.get_arguments().any(|a| a.get_long() == Some(long))
    }

    #[test]
    fn every_command_that_changes_something_has_dry_run_and_every_result_json() {
        let commands = all();
        for (name, cmd) in &commands {
            let changes = CHANGES.contains(&name.as_str());
            assert!(
                changes != READS.contains(&name.as_str()),
                "`{name}` must be listed once: in CHANGES (it needs --dry-run) or READS"
            );
            assert_eq!(has(cmd, "dry-run"), changes, "`{name}` and --dry-run");
            assert_eq!(
                has(cmd, "json"),
                !NO_JSON.contains(&name.as_str()),
                "`{name}` and --json"
            );
        }
        for listed in CHANGES.iter().chain(READS) {
            assert!(
                commands.iter().any(|(n, _)| n == listed),
                "`{listed}` is listed but is no command"
            );
        }
    }

    #[test]
    fn every_argument_has_help_text() {
        let mut bare = Vec::new();
        for (name, cmd) in all() {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() {
                    bare.push(format!("{name}: {id}"));
                }
            }
        }
        assert!(bare.is_empty(), "arguments without help text: {bare:#?}");
    }

    #[test]
    fn a_flag_name_means_one_thing_everywhere() {
        // Per long flag: whether it takes a value, and its value's name.
        let mut seen: BTreeMap<String, (bool, String, String)> = BTreeMap::new();
        for (name, cmd) in all() {
            for arg in cmd.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                let takes = arg.get_action().takes_values();
                let value = arg
                    .get_value_names()
                    .map(|v| {
                        v.iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                match seen.get(long) {
                    Some((t, v, first)) => assert!(
                        *t == takes && (*v == value || !takes || long == "region"),
                        "--{long} of `{name}` ({takes}, {value}) differs from `{first}`'s ({t}, {v})"
                    ),
                    None => {
                        seen.insert(long.to_owned(), (takes, value, name.clone()));
                    }
                }
            }
        }
        // The flags the issue named: one kind each.
        assert!(!seen["json"].0 && !seen["dry-run"].0 && !seen["keep-vm"].0);
        assert!(seen["keep"].0 && seen["region"].0);
    }

    #[test]
    fn completions_and_manual_pages_generate() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "devos-build", &mut script);
            let script = String::from_utf8(script).unwrap();
            assert!(
                script.contains("devos-build") && script.contains("dry-run"),
                "{shell}: {script}"
            );
        }
        let top = super::man_page(&[]).unwrap();
        assert!(top.contains(".TH devos-build"), "{top}");
        for (name, _) in all() {
            let words: Vec<String> = name.split(' ').map(str::to_owned).collect();
            let page = super::man_page(&words).unwrap();
            assert!(
                page.contains(&format!(".TH devos-build-{}", words.join("-"))),
                "{name}: {page}"
            );
        }
        let err = super::man_page(&["image".into(), "bild".into()]).unwrap_err();
        assert!(
            err.to_string()
                .contains("`devos-build image bild` is not a command")
        );
        assert_eq!(super::exit_code(&err), std::process::ExitCode::from(2));
    }

    /// The AWS SDK's warnings (no credentials in the environment, no region in a
    /// profile) are not the user's business at the default level; with -v they are.
    #[test]
    fn the_sdks_logs_show_only_with_verbose() {
        use tracing::level_filters::LevelFilter;
        use tracing_subscriber::EnvFilter;

        let quiet = super::log_filter("info", false);
        for target in ["aws_config", "aws_smithy_runtime", "hyper"] {
            assert!(quiet.contains(&format!("{target}=error")), "{quiet}");
        }
        let filter = EnvFilter::try_new(&quiet).unwrap();
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::INFO));
        assert_eq!(super::log_filter("debug", true), "debug");
    }
}

#[cfg(test)]
mod built_tests {
    use crate::model::manifest::{SecureBoot, UpdateFeed, UpdateFile};

    /// The build's summary names the update bundle, the feed and key, and the Secure
    /// Boot certificate when the image has them, and nothing of them when not.
    #[test]
    fn the_build_summary_says_how_the_image_updates_and_is_signed() {
        let plain = crate::store::registry::tests::manifest("0.2.0", &[]);
        let mut built = crate::build::Built {
            dir: "/out".into(),
            manifest: plain,
            fresh: true,
            files: Vec::new(),
        };
        let said = super::built_human(&built, None, None);
        assert!(
            !said.contains("update") && !said.contains("Secure Boot"),
            "{said}"
        );
        built.manifest.update = vec![
            UpdateFile {
                file: "x.root".into(),
                sha256: String::new(),
                size: 1,
            };
            3
        ];
        built.manifest.update_feed = Some(UpdateFeed {
            url: "https://updates.example.com/".into(),
            key_fingerprint: "F00D".into(),
        });
        built.manifest.secure_boot = Some(SecureBoot {
            certificate_sha256: "ab12".into(),
            subject: "CN = DevOS".into(),
            certificate: String::new(),
        });
        let said = super::built_human(&built, None, None);
        assert!(said.contains("  update/ (3 files"), "{said}");
        assert!(
            said.contains("updates from https://updates.example.com/, signed by F00D"),
            "{said}"
        );
        assert!(
            said.contains("Secure Boot: signed by CN = DevOS (certificate sha256 ab12)"),
            "{said}"
        );
    }
}
