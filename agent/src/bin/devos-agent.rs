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
    /// Run one action in its sandbox (internal: the daemon starts this with the
    /// action on stdin; nothing runs before the sandbox is complete).
    #[command(hide = true)]
    SandboxExec {
        /// The stage inside the namespaces.
        #[arg(long)]
        inside: bool,
    },
    /// Plan and classify a request as the calling user (internal: the daemon starts
    /// this with the request on stdin; it drops to the user first).
    #[command(hide = true)]
    PlanExec,
    /// Keep a user's projects indexed as that user (internal: the daemon starts this
    /// with the job on stdin and reads its updates).
    #[command(hide = true)]
    ContextWatch,
    /// Run the boot self-test checks and report them as JSON lines (used by
    /// devos-selftest.service during `devos-build image test`).
    SelfTest {
        /// Where to write the results (the host's virtio-serial port).
        #[arg(long, default_value = "/dev/virtio-ports/org.devos.selftest")]
        report: PathBuf,
    },
    /// Succeed once the agent serves on the system bus and its audit log verifies (the
    /// fleet health signal's checks); fail after WAIT seconds. A version on trial is
    /// good only after this (devos-boot-complete.service, before boot-complete.target).
    BootCheck {
        /// Seconds to wait for the agent to serve and its log to verify.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Give USER the SSH keys of this EC2 instance's key pair (read from instance
    /// metadata with IMDSv2) in /var/lib/devos/ssh/authorized_keys/USER, replacing what
    /// an earlier boot wrote; on a machine that is not on EC2, do nothing (used by
    /// devos-ec2-keys.service).
    Ec2Keys {
        /// The user who gets the keys (the image's default user).
        #[arg(long, env = "DEVOS_EC2_USER")]
        user: String,
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
    // The helpers stay single-threaded on purpose: identity and filters apply to
    // this one thread, which then becomes the action.
    let helper = match cli.command {
        Some(Command::SandboxExec { inside: false }) => {
            Some(devos_agent::sandbox::outer::exec_from_stdin())
        }
        Some(Command::SandboxExec { inside: true }) => {
            Some(devos_agent::sandbox::inner::exec_from_stdin())
        }
        Some(Command::PlanExec) => Some(devos_agent::caller::plan_exec_from_stdin()),
        Some(Command::ContextWatch) => Some(devos_agent::context::watch::watch_from_stdin()),
        _ => None,
    };
    if let Some(code) = helper {
        return Ok(ExitCode::from(code.clamp(0, 255) as u8));
    }
    // The agent's own files are root's alone, with or without systemd's UMask=.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
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
        Command::SandboxExec { .. } | Command::PlanExec | Command::ContextWatch => {
            unreachable!("handled before the runtime starts")
        }
        Command::Ec2Keys { user } => {
            let dir = std::path::Path::new(devos_agent::ec2::AUTHORIZED_KEYS_DIR);
            match rt.block_on(devos_agent::ec2::install_key_pair(&user, dir))? {
                devos_agent::ec2::KeysOutcome::NotOnEc2 => {
                    eprintln!("not an EC2 instance: no key pair to read");
                }
                devos_agent::ec2::KeysOutcome::Written { path, keys } => {
                    eprintln!(
                        "{keys} key(s) of the instance's key pair for {user} in {}",
                        path.display()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BootCheck { wait } => {
            let wait = std::time::Duration::from_secs(wait);
            rt.block_on(devos_agent::update::boot_check(wait))?;
            eprintln!("the agent serves and its audit log verifies: this boot is good");
            Ok(ExitCode::SUCCESS)
        }
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
