//! The `weightgrad` binary.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    weightgrad::alloc_tuning::keep_freed_memory();
    let cli = weightgrad::cli::Cli::parse();
    // Logs go to stderr; WEIGHTGRAD_LOG (tracing's filter syntax) overrides the default.
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIGHTGRAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,weightgrad=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match weightgrad::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
