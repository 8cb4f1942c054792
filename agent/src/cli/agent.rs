//! `weightgrad agent --config FILE`: runs one region's agent until its run is over (or
//! SIGTERM/SIGINT), then prints its report.

use crate::config::AgentConfig;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Options of `weightgrad agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent's TOML configuration.
    #[arg(long)]
    config: PathBuf,
    /// Also write the final report (JSON) to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Runs `weightgrad agent`.
pub fn run(args: AgentArgs) -> Result<()> {
    let cfg = AgentConfig::load(&args.config)?;
    let problems = cfg.check_files();
    if !problems.is_empty() {
        anyhow::bail!(
            "{}: {} problem(s):\n  {}",
            args.config.display(),
            problems.len(),
            problems.join("\n  ")
        );
    }
    let report = crate::node::run(cfg, Arc::new(AtomicBool::new(false)))?;
    let json = serde_json::to_string(&report)?;
    if let Some(path) = &args.report {
        crate::atomic_file::write(path, &[json.as_bytes()])
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "{}: {} rounds, test top-1 {:.2}%, WAN {} bytes sent, LAN {} bytes{}",
        report.region,
        report.rounds,
        report.test_accuracy * 100.0,
        report.wan_bytes,
        report.lan_bytes,
        if report.interrupted {
            " (stopped early)"
        } else {
            ""
        }
    );
    println!("{json}");
    Ok(())
}
