//! `weightgrad bench`: policies side by side on one scenario of the virtual-time WAN.

use crate::bench::{self, plot};
use crate::sim::SimConfig;
use crate::train::dataset::embedded_digits;
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Options of `weightgrad bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Policies to compare (comma-separated); full-sync gives the ratios.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "full-sync,gaia,terngrad,qsgd,topk,diloco,weightgrad,adaptive"
    )]
    policies: Vec<String>,
    /// paper-3dc, 8dc, asymmetric, non-iid or link-drop.
    #[arg(long, default_value = "paper-3dc")]
    scenario: String,
    /// Top-1 every region must reach (0..1).
    #[arg(long, default_value_t = 0.95)]
    target_accuracy: f64,
    /// Seed shared by every run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Passes over each region's data.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Write results.md and SVG plots here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also run these policies (comma-separated) as real agents over QUIC through the WAN
    /// emulator and compare with the simulator on bytes and time.
    #[arg(long, value_delimiter = ',')]
    real: Vec<String>,
}

/// Runs `weightgrad bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.target_accuracy) {
        bail!(
            "--target-accuracy {} is not a fraction in 0..=1",
            args.target_accuracy
        );
    }
    let mut cfg = SimConfig::demo(3, args.seed);
    cfg.epochs = args.epochs;
    bench::apply_scenario(&args.scenario, &mut cfg)?;
    let data = embedded_digits()?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let report = bench::run_all(
        &cfg,
        &args.scenario,
        &args.policies,
        args.target_accuracy,
        &data,
        &mut |name, done, total| {
            bar.set_message(name.to_string());
            bar.set_length(total);
            bar.set_position(done);
        },
    )?;
    bar.finish_and_clear();
    let mut md = bench::markdown(&report);
    let mut checks = Vec::new();
    if !args.real.is_empty() {
        let exe = std::env::current_exe().context("locating this binary for --real")?;
        let work = match &args.out {
            Some(dir) => dir.join("real"),
            None => {
                std::env::temp_dir().join(format!("weightgrad-bench-real-{}", std::process::id()))
            }
        };
        for policy in &args.real {
            eprintln!("running {policy} as real agents in {} ...", work.display());
            checks.push(bench::real::check(&cfg, policy, &exe, &work)?);
        }
        md += "\nReal agents through the WAN emulator against the simulator with the measured per-round work:\n\n";
        md += &bench::real::markdown(&checks);
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("results.md"), &md)?;
        plot::accuracy_against(
            &report,
            plot::Axis::WanBytes,
            &dir.join("accuracy_vs_wan_bytes.svg"),
        )?;
        plot::accuracy_against(
            &report,
            plot::Axis::VirtualTime,
            &dir.join("accuracy_vs_time.svg"),
        )?;
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if !checks.is_empty() {
            v["real"] = serde_json::to_value(&checks)?;
        }
        println!("{v}");
    } else {
        print!("{md}");
    }
    Ok(())
}
