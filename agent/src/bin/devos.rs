//! `devos`: talk to the DevOS agent.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = <devos_agent::cli::Cli as clap::Parser>::parse();
    match devos_agent::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("devos: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
