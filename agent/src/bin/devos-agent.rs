//! `devos-agent`: the DevOS agent daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use devos_agent::config::{self, AgentConfig};

/// The DevOS developer agent, a D-Bus system service (org.devos.Agent1).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Serve,
    /// Run the boot self-test checks and report them as JSON lines (used by
    /// devos-selftest.service during `devos-build image test`).
    /// Run one action in the sandbox (internal: the daemon starts this with the
    /// action on stdin; it drops to the calling user before running anything).
    #[command(hide = true)]
    SandboxExec,
    SelfTest {
        /// Where to write the results (the host's virtio-serial port).
        #[arg(long, default_value = "/dev/virtio-ports/org.devos.selftest")]
        report: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("devos-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if matches!(cli.command, Some(Command::SandboxExec)) {
        // Single-threaded on purpose: identity and filters apply to this one thread,
        // which then becomes the action.
        let code = devos_agent::sandbox::exec_from_stdin();
        return Ok(ExitCode::from(code.clamp(0, 255) as u8));
    }
    let config = AgentConfig::load(&cli.config)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVOS_AGENT_LOG")
                .unwrap_or_else(|_| config.log_level.as_str().into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            rt.block_on(devos_agent::service::serve(
                &cli.config,
                config,
                shutdown_signal(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SandboxExec => unreachable!("handled before the runtime starts"),
        Command::SelfTest { report } => {
            let ok = rt.block_on(devos_agent::selftest::run(&report))?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
