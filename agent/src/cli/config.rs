//! `weightgrad config check FILE`: validates an agent configuration without starting
//! anything — syntax, keys, values, the files it names, and the policy it selects (loaded
//! and self-tested in the sandbox).

use crate::config::AgentConfig;
use crate::policy::{PolicyRuntime, Sandbox, SandboxLimits, builtin_wasm};
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;

/// Options of `weightgrad config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// What to do.
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file: keys, values, files, policy.
    Check {
        /// The agent's TOML configuration.
        file: PathBuf,
    },
}

/// Runs `weightgrad config ...`.
pub fn run(args: ConfigArgs) -> Result<()> {
    match args.command {
        ConfigCommand::Check { file } => check(&file),
    }
}

fn check(file: &std::path::Path) -> Result<()> {
    let cfg = AgentConfig::load(file)?;
    let mut problems: Vec<String> = cfg.check_files();
    let policy_bytes = match cfg.policy.wasm_path() {
        Some(path) => std::fs::read(&path).ok(),
        None => builtin_wasm(&cfg.policy.source).map(<[u8]>::to_vec),
    };
    if let Some(bytes) = policy_bytes {
        let sandbox = Arc::new(Sandbox::new(SandboxLimits::default())?);
        if let Err(e) = PolicyRuntime::new(sandbox, &bytes, cfg.policy.on_failure) {
            problems.push(format!("policy.source: {}: {e}", cfg.policy.source));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}: {} problem(s):\n  {}",
            file.display(),
            problems.len(),
            problems.join("\n  ")
        );
    }
    println!(
        "{}: ok — region {}, {} peer(s), policy {}, data {}, model {}",
        file.display(),
        cfg.region,
        cfg.peers.len(),
        cfg.policy.source,
        cfg.data_source().map_err(anyhow::Error::msg)?.label(),
        cfg.training.model
    );
    Ok(())
}
