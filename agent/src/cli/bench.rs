//! `weightgrad bench`: policies side by side on one scenario of the virtual-time WAN.

use super::data_args::DataArgs;
use crate::bench::{self, plot};
use crate::config::Congestion;
use crate::sim::SimConfig;
use crate::train::ModelSpec;
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// Largest `--max-staleness`, the agent config's cap on `training.max_staleness`: it keeps
/// the staleness window's arithmetic far from overflow.
const MAX_STALENESS_BOUND: u64 = 1_000_000;

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
    #[command(flatten)]
    data: DataArgs,
    /// Model: mlp, mlp:W1,W2,..., cnn or logreg (default: cnn on cifar10, logreg on csv,
    /// mlp otherwise).
    #[arg(long)]
    model: Option<String>,
    /// Base learning rate of every region's Adam (cosine schedule over the run).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Virtual milliseconds one training step costs (the same for every policy).
    #[arg(long, default_value_t = 5.0)]
    compute_ms: f64,
    /// Rounds a region may run ahead of the slowest peer; with several (comma-separated),
    /// every policy runs at each, and ratios are given against full-sync at the same bound
    /// and against the fastest full-sync.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    max_staleness: Vec<u64>,
    /// Simulations run at a time (default: one per CPU). Each is deterministic, so the
    /// figures are the same for any value.
    #[arg(long)]
    jobs: Option<usize>,
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
    /// Congestion controller of the `--real` agents' WAN connections (default: the agent's,
    /// cubic; the simulator's links carry their full bandwidth from the first byte).
    #[arg(long, value_enum, requires = "real")]
    congestion: Option<Congestion>,
    /// Whether the `--real` agents run a round's WAN work beside the next step
    /// (`[training] overlap`; default: the agent's, true; mean merges never overlap).
    #[arg(long, requires = "real", action = clap::ArgAction::Set)]
    overlap: Option<bool>,
}

/// Runs `weightgrad bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.target_accuracy) {
        bail!(
            "--target-accuracy {} is not a fraction in 0..=1",
            args.target_accuracy
        );
    }
    if !(args.compute_ms.is_finite() && args.compute_ms >= 0.0) {
        bail!(
            "--compute-ms {} is not a non-negative number of milliseconds",
            args.compute_ms
        );
    }
    let source = args.data.source()?;
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr {} is not a positive learning rate", args.lr);
    }
    let mut cfg = SimConfig::demo(3, args.seed);
    cfg.epochs = args.epochs;
    cfg.lr = args.lr;
    cfg.compute_s = args.compute_ms / 1e3;
    if let Some(b) = args
        .max_staleness
        .iter()
        .find(|&&b| b > MAX_STALENESS_BOUND)
    {
        bail!("--max-staleness {b} is more than {MAX_STALENESS_BOUND} rounds");
    }
    if let Some(b) = args
        .max_staleness
        .iter()
        .enumerate()
        .find_map(|(i, b)| args.max_staleness[..i].contains(b).then_some(b))
    {
        bail!("--max-staleness names bound {b} twice");
    }
    match args.max_staleness.as_slice() {
        [] => bail!("--max-staleness needs at least one bound"),
        // The bound --real agents run at.
        [b] => cfg.sync.max_staleness = *b,
        _ if !args.real.is_empty() => bail!(
            "--real compares agents with the simulator at one staleness bound; give one --max-staleness, not {}",
            args.max_staleness.len()
        ),
        _ => {}
    }
    if args.jobs == Some(0) {
        bail!("--jobs must be at least 1");
    }
    cfg.model = match &args.model {
        Some(m) => ModelSpec::parse(m).context("--model")?,
        None => bench::default_model(&source),
    };
    bench::apply_scenario(&args.scenario, &mut cfg)?;
    let data = source.load(args.seed)?;
    let setup = bench::BenchSetup::describe(&cfg, &source.label(), &data, &args.max_staleness)
        .with_context(|| format!("model {} on {}", cfg.model, source.label()))?;
    let plan = bench::BenchPlan {
        scenario: args.scenario.clone(),
        policies: args.policies.clone(),
        staleness_bounds: args.max_staleness.clone(),
        target: args.target_accuracy,
        jobs: args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    let bars = MultiProgress::new();
    let running: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let style =
        ProgressStyle::with_template("{spinner} {msg:>22} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("static template")
            .progress_chars("=> ");
    let report = bench::run_all(&cfg, &plan, setup, &data, &|name, done, total| {
        let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
        let bar = running.entry(name.to_string()).or_insert_with(|| {
            let bar = bars.add(ProgressBar::new(total).with_style(style.clone()));
            bar.set_message(name.to_string());
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
        if done == total {
            bar.finish_and_clear();
        }
    })?;
    bars.clear().ok();
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
            checks.push(bench::real::check(
                &cfg,
                &source,
                &data,
                policy,
                args.target_accuracy,
                &bench::real::Agents {
                    exe: &exe,
                    dir: &work,
                    congestion: args.congestion.unwrap_or_default(),
                    overlap: args.overlap.unwrap_or(true),
                },
            )?);
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
