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
            if devos_build::store::registry::is_busy(&e) {
                eprintln!(
                    "  hint: another devos-build holds the registry's lock (SQLite waits up to 30 s for it); run this again once that one is done"
                );
            }
            devos_build::cli::exit_code(&e)
        }
    }
}
