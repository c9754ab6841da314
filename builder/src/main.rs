use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = devos_build::cli::Cli::parse();
    match devos_build::cli::run(cli) {
        Ok(code) => code,
        // `devos-build ... | head -1`: the reader has what it wanted.
        Err(e) if devos_build::support::stdout::is_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
