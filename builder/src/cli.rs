//! The `devos-build` command line: clap definitions (doc comments are the help text)
//! and one function per verb.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::boottest::{self, TestOptions};
use crate::build::{self, BuildOptions};
use crate::spec::DEFAULT_SPEC;
use crate::ui::Ui;

/// Build, boot-test and publish immutable DevOS images from declarative specs.
#[derive(Parser)]
#[command(name = "devos-build", version, about)]
pub struct Cli {
    /// Log every external command and more (also: DEVOS_LOG=debug).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Build, test and inspect images.
    #[command(subcommand)]
    Image(ImageCommand),
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
        /// Boot-test the image after building it; fail if the test fails.
        #[arg(long)]
        test: bool,
        #[command(flatten)]
        vm: VmArgs,
        /// Print the manifest (and test report) as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Boot an image under QEMU and check that it comes up and its agent answers.
    Test {
        /// An image file, an image output directory, or a spec (its newest build).
        #[arg(default_value = DEFAULT_SPEC)]
        target: PathBuf,
        #[command(flatten)]
        vm: VmArgs,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Boot an image interactively with the serial console on this terminal.
    Boot {
        /// An image file, an image output directory, or a spec (its newest build).
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
    match cli.command {
        Command::Doctor { json } => {
            let report = crate::doctor::check();
            let ok = report.tools.iter().all(|t| t.found.is_some());
            output(json, &report, || report.human(), ok)
        }
        Command::Image(ImageCommand::Build {
            spec,
            out,
            agent_deb,
            force,
            test,
            vm,
            json,
        }) => {
            let built = build::build(
                &BuildOptions {
                    spec,
                    out,
                    agent_deb,
                    force,
                },
                &mut ui,
            )?;
            let report = if test {
                let target = boottest::Target {
                    disk: built.manifest.raw(&built.dir).unwrap_or_default(),
                    manifest: Some(built.manifest.clone()),
                };
                ui.info("==> boot test");
                Some(boottest::test(&target, &vm.options())?)
            } else {
                None
            };
            let value = serde_json::json!({
                "dir": built.dir,
                "fresh": built.fresh,
                "manifest": built.manifest,
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
                if let Some(r) = &report {
                    s.push_str(&r.summary());
                }
                s
            };
            output(
                json,
                &value,
                human,
                report.as_ref().is_none_or(|r| r.passed),
            )
        }
        Command::Image(ImageCommand::Test { target, vm, json }) => {
            let target = boottest::resolve_target(&target)?;
            let report = boottest::test(&target, &vm.options())?;
            output(json, &report, || report.summary(), report.passed)
        }
        Command::Image(ImageCommand::Boot {
            target,
            ssh_port,
            memory,
            cpus,
        }) => {
            let target = boottest::resolve_target(&target)?;
            boottest::boot(&target, memory, cpus, ssh_port)?;
            Ok(ExitCode::SUCCESS)
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ui.is_fancy())
        .without_time()
        .try_init();
}
