//! `devos`: talk to the DevOS agent.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = <devos_agent::cli::Cli as clap::Parser>::parse();
    match devos_agent::cli::run(cli) {
        Ok(code) => code,
        // The reader of stdout has all it wanted (`devos history | head`).
        Err(e) if devos_agent::stdout::is_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devos: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
