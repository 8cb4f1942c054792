//! The `weightgrad` command line.

mod admin_client;
mod agent;
mod bench;
mod certs;
mod config;
mod data_args;
mod demo;
mod policy;
mod policy_author;
mod train;
mod wan_emu;

use clap::{Parser, Subcommand};

/// The version `--version` prints, with the optional features this binary was built with.
pub const VERSION: &str = if cfg!(feature = "cuda") {
    concat!(env!("CARGO_PKG_VERSION"), " (features: cuda)")
} else {
    env!("CARGO_PKG_VERSION")
};

/// WeightGrad: train one model across regions over slow WAN links.
#[derive(Debug, Parser)]
#[command(name = "weightgrad", version = VERSION, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run this region's agent: train, and exchange updates with peer regions over QUIC.
    Agent(agent::AgentArgs),
    /// Show a running agent's status (round, peers, policy, bytes).
    Status(admin_client::StatusArgs),
    /// Train one replica locally (no WAN): the single-region reference.
    Train(train::TrainArgs),
    /// Compare policies side by side on a scenario of the simulated WAN.
    Bench(bench::BenchArgs),
    /// Run several regions in one process over a simulated WAN (embedded digits).
    Demo(demo::DemoArgs),
    /// Write, build, check, list, export and push policies.
    Policy(policy::PolicyArgs),
    /// Validate agent configuration files.
    Config(config::ConfigArgs),
    /// Create quick-start TLS certificates.
    Certs(certs::CertsArgs),
    /// Relay UDP through an emulated WAN link (bandwidth, delay, jitter, loss).
    WanEmu(wan_emu::WanEmuArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => agent::run(args),
        Command::Status(args) => admin_client::status(args),
        Command::Train(args) => train::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run_demo(args),
        Command::Policy(args) => policy::run(args),
        Command::Config(args) => config::run(args),
        Command::Certs(args) => certs::run(args),
        Command::WanEmu(args) => wan_emu::run(args),
    }
}
