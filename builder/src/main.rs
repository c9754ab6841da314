use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = devos_build::cli::Cli::parse();
    match devos_build::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
