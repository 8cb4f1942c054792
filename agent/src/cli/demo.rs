//! `weightgrad demo`: N regions in one process over the virtual-time WAN, optionally
//! beside a baseline policy trained in the same invocation with the same seeds.

use crate::lan::LanPlacement;
use crate::policies::{builtin, merge_mode_for};
use crate::policy::{FailStrategy, PolicyRuntime, Sandbox, SandboxLimits, builtin_wasm};
use crate::sim::{SimConfig, SimReport, run, topology::Topology};
use crate::train::dataset::{ShardStrategy, embedded_digits};
use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// Options of `weightgrad demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of regions.
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// Workers per region.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Policy to run: full-sync, gaia, terngrad, qsgd, topk, weightgrad, diloco or adaptive.
    #[arg(long, default_value = "weightgrad")]
    policy: String,
    /// Also run this baseline policy and report ratios against it.
    #[arg(long)]
    compare: Option<String>,
    /// Seed shared by both runs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Passes over each region's data.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Rounds a region may run ahead of the slowest peer.
    #[arg(long, default_value_t = 1)]
    max_staleness: u64,
    /// Deal classes unevenly across regions (label skew).
    #[arg(long)]
    non_iid: bool,
    /// Treat every region's workers as reaching their aggregator over a WAN: LAN plans may
    /// then not choose data mode (samples would leave the region).
    #[arg(long)]
    lan_crosses_wan: bool,
    /// Allow data mode even where the workers reach their aggregator over a WAN.
    #[arg(long, requires = "lan_crosses_wan")]
    allow_data_over_wan: bool,
    /// Run the policies as their WebAssembly components in the sandbox (as the agent
    /// does) instead of natively.
    #[arg(long)]
    wasm: bool,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn simulate(
    cfg: &SimConfig,
    name: &str,
    wasm: bool,
    data: &crate::train::DataSplit,
) -> Result<SimReport> {
    let policy: Box<dyn weightgrad_sdk::Policy> = if wasm {
        let sandbox = std::sync::Arc::new(Sandbox::new(SandboxLimits::default())?);
        let bytes = builtin_wasm(name)
            .ok_or_else(|| anyhow::anyhow!("no WebAssembly build of {name:?}"))?;
        Box::new(
            PolicyRuntime::new(sandbox, bytes, FailStrategy::LastGood)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?,
        )
    } else {
        builtin(name).map_err(anyhow::Error::msg)?
    };
    let mut cfg = cfg.clone();
    cfg.sync.merge = merge_mode_for(name);
    let cfg = &cfg;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:>12} [{bar:30}] {pos}/{len} region-rounds {elapsed}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(name.to_string());
    let report = run(cfg, policy.as_ref(), data, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    Ok(report)
}

fn summary(r: &SimReport) -> Value {
    json!({
        "policy": r.policy,
        "regions": r.regions,
        "wan_bytes": r.wan_bytes,
        "lan_bytes": r.lan_bytes,
        "virtual_seconds": r.virtual_seconds,
        "rounds": r.rounds,
        "rejected_messages": r.rejected,
        "curve": r.curve,
    })
}

fn print_table(r: &SimReport) {
    println!(
        "policy {}: {} rounds, {:.1} virtual s",
        r.policy, r.rounds, r.virtual_seconds
    );
    for region in &r.regions {
        println!(
            "  {:<14} test top-1 {:>6.2}%  loss {:.4}",
            region.name,
            100.0 * region.test_accuracy,
            region.test_loss
        );
    }
    println!(
        "  WAN bytes {:>14}   LAN bytes {:>14}",
        r.wan_bytes, r.lan_bytes
    );
}

/// Runs `weightgrad demo`.
pub fn run_demo(args: DemoArgs) -> Result<()> {
    if args.regions < 2 {
        bail!("--regions must be at least 2, got {}", args.regions);
    }
    for name in std::iter::once(&args.policy).chain(args.compare.as_ref()) {
        builtin(name).map_err(anyhow::Error::msg)?;
    }
    let data = embedded_digits()?;
    let mut cfg = SimConfig::demo(args.regions, args.seed);
    cfg.topology = Topology::default_for(args.regions);
    cfg.workers = args.workers;
    cfg.epochs = args.epochs;
    cfg.sync.max_staleness = args.max_staleness;
    if args.non_iid {
        cfg.sharding = ShardStrategy::LabelSkew;
    }
    cfg.lan_placement = LanPlacement {
        crosses_wan: args.lan_crosses_wan,
        allow_data_over_wan: args.allow_data_over_wan,
    };
    let ours = simulate(&cfg, &args.policy, args.wasm, &data)?;
    let baseline = match &args.compare {
        Some(name) => Some(simulate(&cfg, name, args.wasm, &data)?),
        None => None,
    };
    let mut out = summary(&ours);
    if !args.json {
        print_table(&ours);
    }
    if let Some(base) = &baseline {
        // Target: the baseline's final accuracy (lowest region); compare what each run
        // spent to first reach it.
        let target = base.curve.last().map_or(0.0, |p| p.min_accuracy);
        let base_at = base.first_reaching(target);
        let ours_at = ours.first_reaching(target);
        let ratio = |b: Option<f64>, o: Option<f64>| match (b, o) {
            (Some(b), Some(o)) if o > 0.0 => Some(b / o),
            _ => None,
        };
        let wan_ratio = ratio(
            base_at.map(|p| p.wan_bytes as f64),
            ours_at.map(|p| p.wan_bytes as f64),
        );
        let time_ratio = ratio(
            base_at.map(|p| p.virtual_seconds),
            ours_at.map(|p| p.virtual_seconds),
        );
        out["baseline"] = summary(base);
        out["target_accuracy"] = json!(target);
        out["wan_bytes_to_target"] = json!(ours_at.map(|p| p.wan_bytes));
        out["baseline_wan_bytes_to_target"] = json!(base_at.map(|p| p.wan_bytes));
        out["wan_bytes_ratio"] = json!(wan_ratio);
        out["time_ratio"] = json!(time_ratio);
        if !args.json {
            print_table(base);
            println!(
                "target (baseline's final lowest-region top-1): {:.2}%",
                100.0 * target
            );
            match (wan_ratio, time_ratio) {
                (Some(w), Some(t)) => println!(
                    "{} reached it with {w:.1}x fewer WAN bytes and {t:.2}x the speed of {}",
                    ours.policy, base.policy
                ),
                _ => println!("{} never reached the baseline's accuracy", ours.policy),
            }
        }
    }
    if args.json {
        println!("{out}");
    }
    Ok(())
}
