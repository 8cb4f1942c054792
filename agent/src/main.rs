//! The `weightgrad` binary.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = weightgrad::cli::Cli::parse();
    match weightgrad::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
