//! `weightgrad certs init`: a CA and one certificate per region, for quick starts.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Options of `weightgrad certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// What to do.
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a CA and a certificate per region (quick starts; production brings its own PKI).
    Init {
        /// Region names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        regions: Vec<String>,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `weightgrad certs ...`.
pub fn run(args: CertsArgs) -> Result<()> {
    match args.command {
        CertsCommand::Init {
            regions,
            out,
            force,
        } => {
            let written = crate::wan::certs::init(&regions, &out, force)?;
            println!(
                "CA: {} (key {})",
                written.ca.0.display(),
                written.ca.1.display()
            );
            for (name, cert, key) in &written.regions {
                println!("{name}: {} (key {})", cert.display(), key.display());
            }
            println!(
                "certificates are valid for {} days; keep ca.key offline once every region has its certificate",
                crate::wan::certs::VALID_DAYS
            );
            Ok(())
        }
    }
}
