//! `weightgrad bench`: policies side by side on one scenario of the virtual-time WAN.

use super::data_args::DataArgs;
use crate::bench::{self, plot, seeds};
use crate::config::{Congestion, InitialWindow};
use crate::sim::SimConfig;
use crate::train::dataset::DataSource;
use crate::train::{DataSplit, ModelSpec};
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
    /// Policies to compare (comma-separated); full-sync gives the ratios. In the simulator a
    /// variant of the weightgrad policy may be named by its changed knobs, e.g.
    /// `weightgrad:every=1:budget=0.16:bits=4` (knobs: every, budget, bits, tau, lan, floor, backlog).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "full-sync,gaia,terngrad,qsgd,topk,diloco,weightgrad,adaptive"
    )]
    policies: Vec<String>,
    /// paper-3dc, ec2-3dc (published inter-region round trips and bandwidths, the latter
    /// scaled to a tenth), 8dc, asymmetric, non-iid or link-drop.
    #[arg(long, default_value = "paper-3dc")]
    scenario: String,
    /// Multiplies every link's bandwidth of the scenario (the simulator's and the real
    /// agents' emulated links alike): how the comparison moves as the WAN gets thinner or
    /// wider against the same compute.
    #[arg(long, default_value_t = 1.0)]
    bandwidth_scale: f64,
    /// Top-1 every region must reach (0..1), or `full-sync`: full-sync's final top-1 in the
    /// same run (what it costs each policy to match it).
    #[arg(long, default_value = "0.95")]
    target_accuracy: bench::BenchTarget,
    /// Seed shared by every run.
    #[arg(long, default_value_t = 0, conflicts_with = "seeds")]
    seed: u64,
    /// Run the whole bench once per seed (comma-separated, e.g. 0,1,2) and add each
    /// policy's mean and spread over them, its ratios to full-sync taken seed by seed.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Passes over each region's data.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Rounds between evaluations on the test set, in the simulator, the `--real` agents
    /// and the peers alike (default: one epoch's rounds). Time and bytes to the target are
    /// read at the first evaluation that reaches it, so a finer interval reads them closer.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    evaluate_every: Option<u64>,
    #[command(flatten)]
    data: DataArgs,
    /// Model: mlp, mlp:W1,W2,..., cnn, logreg or transformer:LAYERS,DIM,HEADS,CONTEXT
    /// (default: cnn on cifar10, logreg on csv, the transformer on text, mlp otherwise).
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
    /// emulator and compare with the simulator on bytes and time; a policy named twice
    /// runs twice (the agents' own run-to-run spread).
    #[arg(long, value_delimiter = ',')]
    real: Vec<String>,
    /// Congestion controller of the `--real` agents' WAN connections (default: the agent's,
    /// cubic; the simulator's links carry their full bandwidth from the first byte).
    #[arg(long, value_enum, requires = "real")]
    congestion: Option<Congestion>,
    /// Where the `--real` agents' congestion windows start (default: the agent's, one
    /// bandwidth-delay product of the link, `link`; `standard` for RFC 9002's ten datagrams).
    #[arg(long, value_enum, requires = "real")]
    initial_window: Option<InitialWindow>,
    /// Whether the `--real` agents run a round's WAN work beside the next step
    /// (`[training] overlap`; default: the agent's, true; mean merges never overlap).
    #[arg(long, requires = "real", action = clap::ArgAction::Set)]
    overlap: Option<bool>,
    /// Another system on the same shards and emulated links after the real agents, in the
    /// same table: `NAME=COMMAND`, run as `sh -c 'COMMAND --setup DIR --result FILE'`
    /// (`bench/peers/torch_ddp.py` is one; MLP and logistic-regression models). Repeatable.
    #[arg(long, requires = "real")]
    peer: Vec<bench::peer::PeerCommand>,
    /// Of the `--real` policies, these run for every seed at once (comma-separated), after
    /// the others have run one at a time. For runs whose rounds wait seconds on the WAN
    /// while the cores idle (full-sync on a thin WAN): it divides their wall-clock by the
    /// seeds. Their agents share the cores, which their measured per-round work, and so the
    /// simulator's comparison, includes; the host's receive-buffer drops are the host's.
    #[arg(long, value_delimiter = ',', requires = "real")]
    real_concurrent: Vec<String>,
    /// The peers run for every seed at once, beside the `--real-concurrent` agents, instead
    /// of one at a time after them. For peers whose steps wait on the WAN (a gradient
    /// all-reduce over thin links): it takes their hours off the end of the run. They share
    /// the cores with those agents, as those agents share them with each other.
    #[arg(long, requires = "peer")]
    peer_concurrent: bool,
    /// Minutes one `--real` run (or one `--peer` run) may take before it is stopped as stuck.
    #[arg(long, default_value_t = 60, requires = "real")]
    real_timeout_minutes: u64,
    /// Draws of the links' jitter and loss the simulator's prediction of a `--real` run
    /// averages: a WAN-bound run's time depends on where its losses fall (each draw is
    /// one more simulation of the policy).
    #[arg(long, default_value_t = 4, requires = "real")]
    sim_draws: u64,
}

/// Runs `weightgrad bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    if !(args.compute_ms.is_finite() && args.compute_ms >= 0.0) {
        bail!(
            "--compute-ms {} is not a non-negative number of milliseconds",
            args.compute_ms
        );
    }
    if !(args.bandwidth_scale.is_finite() && args.bandwidth_scale > 0.0) {
        bail!(
            "--bandwidth-scale {} is not a positive factor",
            args.bandwidth_scale
        );
    }
    let source = args.data.source()?;
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr {} is not a positive learning rate", args.lr);
    }
    if let Some(b) = args
        .max_staleness
        .iter()
        .find(|&&b| b > MAX_STALENESS_BOUND)
    {
        bail!("--max-staleness {b} is more than {MAX_STALENESS_BOUND} rounds");
    }
    if let Some(b) = first_repeated(&args.max_staleness) {
        bail!("--max-staleness names bound {b} twice");
    }
    if let Some(seed) = first_repeated(&args.seeds) {
        bail!("--seeds names seed {seed} twice");
    }
    match args.max_staleness.as_slice() {
        [] => bail!("--max-staleness needs at least one bound"),
        [_] => {}
        _ if !args.real.is_empty() => bail!(
            "--real compares agents with the simulator at one staleness bound; give one --max-staleness, not {}",
            args.max_staleness.len()
        ),
        _ => {}
    }
    if args.jobs == Some(0) {
        bail!("--jobs must be at least 1");
    }
    if let Some(p) = args.real_concurrent.iter().find(|p| !args.real.contains(p)) {
        bail!("--real-concurrent names {p}, which --real does not run");
    }
    if args.real_timeout_minutes == 0 {
        bail!("--real-timeout-minutes must be at least 1");
    }
    if args.sim_draws == 0 {
        bail!("--sim-draws must be at least 1");
    }
    let model = match &args.model {
        Some(m) => ModelSpec::parse(m).context("--model")?,
        None => bench::default_model(&source),
    };
    source.check_model(&model).map_err(anyhow::Error::msg)?;
    if !args.peer.is_empty() {
        bench::peer::hidden_widths(&model)?;
    }
    let several = !args.seeds.is_empty();
    let seeds = if several {
        args.seeds.clone()
    } else {
        vec![args.seed]
    };
    let mut runs = Vec::new();
    for &seed in &seeds {
        if several {
            eprintln!("seed {seed}");
        }
        runs.push(simulate_seed(&args, &source, &model, seed)?);
    }
    run_real(&args, &source, &mut runs, several)?;
    let md = if several {
        summary_markdown(&runs, &seeds)
    } else {
        runs[0].markdown()
    };
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("results.md"), &md)?;
        for run in &runs {
            let suffix = if several {
                format!("-seed{}", run.report.seed)
            } else {
                String::new()
            };
            let real = run.checks.iter().any(|c| !c.curve.is_empty());
            for (axis, real_axis, name) in [
                (plot::Axis::WanBytes, plot::Axis::WanBytes, "wan_bytes"),
                (plot::Axis::VirtualTime, plot::Axis::RealTime, "time"),
            ] {
                let file =
                    |prefix: &str| dir.join(format!("{prefix}accuracy_vs_{name}{suffix}.svg"));
                plot::accuracy_against(&run.report, axis, &file(""))?;
                if real {
                    plot::real_accuracy_against(
                        &args.scenario,
                        &run.checks,
                        &run.peers,
                        real_axis,
                        &file("real_"),
                    )?;
                }
            }
        }
    }
    if args.json {
        let one = |run: &SeedRun| -> Result<serde_json::Value> {
            let mut v = serde_json::to_value(&run.report)?;
            if !run.checks.is_empty() {
                v["real"] = serde_json::to_value(&run.checks)?;
            }
            if !run.peers.is_empty() {
                v["peers"] = serde_json::to_value(&run.peers)?;
            }
            Ok(v)
        };
        let v = if several {
            let (sim, real) = summaries(&runs);
            serde_json::json!({
                "seeds": seeds,
                "runs": runs.iter().map(one).collect::<Result<Vec<_>>>()?,
                "summary": sim,
                "real_summary": real,
            })
        } else {
            one(&runs[0])?
        };
        println!("{v}");
    } else {
        print!("{md}");
    }
    Ok(())
}

/// The first value that appears twice.
fn first_repeated(values: &[u64]) -> Option<u64> {
    values
        .iter()
        .enumerate()
        .find_map(|(i, v)| values[..i].contains(v).then_some(*v))
}

/// One seed's bench: the simulated table, the real agents' checks and the peers' runs.
struct SeedRun {
    report: bench::BenchReport,
    /// The simulator's setup the real agents copy.
    cfg: SimConfig,
    data: DataSplit,
    checks: Vec<bench::real::RealCheck>,
    peers: Vec<bench::peer::PeerRun>,
}

impl SeedRun {
    /// The seed's tables in Markdown.
    fn markdown(&self) -> String {
        let mut md = bench::markdown(&self.report);
        if !self.checks.is_empty() {
            md += &format!(
                "\nReal agents through the WAN emulator ({} compute thread(s) each) against the simulator with the measured per-round work and each link's measured queue-drop episodes as loss, its bytes and time the means over {} draw(s) of the links' jitter and loss:\n\n",
                self.checks[0].compute_threads,
                self.checks[0].sim_seconds_draws.len()
            );
            md += &bench::real::markdown(&self.checks);
            md += "\nSide by side on the same emulated links, wall-clock (agents and peers):\n\n";
            md += &bench::peer::markdown(&self.peers, &self.checks);
        }
        md
    }
}

/// Runs every policy of the bench under `seed` in the simulator.
fn simulate_seed(
    args: &BenchArgs,
    source: &DataSource,
    model: &ModelSpec,
    seed: u64,
) -> Result<SeedRun> {
    let mut cfg = SimConfig::demo(3, seed);
    cfg.epochs = args.epochs;
    cfg.evaluate_every = args.evaluate_every;
    cfg.lr = args.lr;
    cfg.compute_s = args.compute_ms / 1e3;
    if let [bound] = args.max_staleness.as_slice() {
        // The bound --real agents run at.
        cfg.sync.max_staleness = *bound;
    }
    cfg.model = model.clone();
    bench::apply_scenario(&args.scenario, &mut cfg)?;
    bench::scale_bandwidth(&mut cfg, args.bandwidth_scale);
    let data = source.load(seed)?;
    let setup = bench::BenchSetup::describe(&cfg, &source.label(), &data, &args.max_staleness)
        .with_context(|| format!("model {} on {}", cfg.model, source.label()))?;
    let plan = bench::BenchPlan {
        scenario: if args.bandwidth_scale == 1.0 {
            args.scenario.clone()
        } else {
            format!("{}, bandwidths ×{}", args.scenario, args.bandwidth_scale)
        },
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
    Ok(SeedRun {
        report,
        cfg,
        data,
        checks: Vec::new(),
        peers: Vec::new(),
    })
}

/// Runs the `--real` policies of every seed as agents (in a directory of their own per
/// seed when there are several): one at a time, then the `--real-concurrent` ones of all
/// seeds at once; then the peers, one at a time (with `--peer-concurrent`, all at once
/// beside the concurrent agents). Each seed's checks keep `--real`'s order, its peers
/// `--peer`'s.
fn run_real(
    args: &BenchArgs,
    source: &DataSource,
    runs: &mut [SeedRun],
    several: bool,
) -> Result<()> {
    if args.real.is_empty() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating this binary for --real")?;
    let base = match &args.out {
        Some(dir) => dir.join("real"),
        None => std::env::temp_dir().join(format!("weightgrad-bench-real-{}", std::process::id())),
    };
    let work = |seed: u64| {
        if several {
            base.join(format!("seed-{seed}"))
        } else {
            base.clone()
        }
    };
    // How long one run of agents, or one peer's run, may take before it is stopped as stuck.
    let timeout = std::time::Duration::from_secs(args.real_timeout_minutes * 60);
    let check = |run: &SeedRun, policy: &str| {
        let dir = work(run.report.seed);
        bench::real::check(
            &run.cfg,
            source,
            &run.data,
            policy,
            run.report.target_accuracy,
            &bench::real::Agents {
                exe: &exe,
                dir: &dir,
                congestion: args.congestion.unwrap_or_default(),
                initial_window: args.initial_window.unwrap_or_default(),
                overlap: args.overlap.unwrap_or(true),
                timeout,
                sim_draws: args.sim_draws,
            },
        )
        .with_context(|| format!("{policy} as real agents, seed {}", run.report.seed))
    };
    // done[seed][k]: the check of `--real`'s k-th policy (named twice, it runs twice).
    let mut done: Vec<Vec<Option<bench::real::RealCheck>>> =
        runs.iter().map(|_| vec![None; args.real.len()]).collect();
    let concurrent = |k: &usize| args.real_concurrent.contains(&args.real[*k]);
    for (i, run) in runs.iter().enumerate() {
        for k in (0..args.real.len()).filter(|k| !concurrent(k)) {
            let policy = &args.real[k];
            eprintln!(
                "running {policy} as real agents in {} ...",
                work(run.report.seed).display()
            );
            done[i][k] = Some(check(run, policy)?);
        }
    }
    let together: Vec<(usize, usize)> = (0..args.real.len())
        .filter(concurrent)
        .flat_map(|k| (0..runs.len()).map(move |i| (i, k)))
        .collect();
    // The peers to run beside them: (seed, peer).
    let beside: Vec<(usize, usize)> = if args.peer_concurrent {
        (0..runs.len())
            .flat_map(|i| (0..args.peer.len()).map(move |p| (i, p)))
            .collect()
    } else {
        Vec::new()
    };
    let peer = |run: &SeedRun, p: usize| {
        let peer = &args.peer[p];
        let dir = work(run.report.seed).join(format!("peer-{}", peer.name));
        eprintln!("running peer {} in {} ...", peer.name, dir.display());
        bench::peer::run(
            peer,
            &run.cfg,
            &run.data,
            run.report.target_accuracy,
            &exe,
            &dir,
            timeout,
        )
        .with_context(|| format!("peer {}, seed {}", peer.name, run.report.seed))
    };
    let mut peers: Vec<Vec<Option<bench::peer::PeerRun>>> =
        runs.iter().map(|_| vec![None; args.peer.len()]).collect();
    if !together.is_empty() || !beside.is_empty() {
        if !together.is_empty() {
            eprintln!(
                "running {} as real agents, {} runs at once ...",
                args.real_concurrent.join(", "),
                together.len()
            );
        }
        let shared: &[SeedRun] = runs;
        let (agents, beside_runs) = std::thread::scope(|s| {
            let agents: Vec<_> = together
                .iter()
                .map(|&(i, k)| s.spawn(move || check(&shared[i], &args.real[k])))
                .collect();
            let beside_runs: Vec<_> = beside
                .iter()
                .map(|&(i, p)| s.spawn(move || peer(&shared[i], p)))
                .collect();
            (joined(agents), joined(beside_runs))
        });
        for ((i, k), result) in together.into_iter().zip(agents) {
            done[i][k] = Some(result?);
        }
        for ((i, p), result) in beside.into_iter().zip(beside_runs) {
            peers[i][p] = Some(result?);
        }
    }
    for ((run, checks), ran) in runs.iter_mut().zip(done).zip(peers) {
        run.checks = checks
            .into_iter()
            .map(|c| c.expect("every real run is done"))
            .collect();
        for (p, ran) in ran.into_iter().enumerate() {
            let result = match ran {
                Some(r) => r,
                None => peer(run, p)?,
            };
            run.peers.push(result);
        }
    }
    Ok(())
}

/// Each thread's result, in order; a thread that panicked is an error.
fn joined<T>(handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>) -> Vec<Result<T>> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a real run's thread panicked")))
        })
        .collect()
}

/// The simulated and the real summaries over the seeds (the real one empty without
/// `--real`).
fn summaries(runs: &[SeedRun]) -> (Vec<seeds::SeedSummary>, Vec<seeds::SeedSummary>) {
    let sim: Vec<_> = runs
        .iter()
        .map(|r| seeds::rows_of_report(&r.report))
        .collect();
    let real: Vec<_> = runs
        .iter()
        .filter(|r| !r.checks.is_empty())
        .map(|r| seeds::rows_of_real(&r.checks, &r.peers))
        .collect();
    (seeds::summarize(&sim), seeds::summarize(&real))
}

/// Each seed's tables, then the summaries over the seeds.
fn summary_markdown(runs: &[SeedRun], seeds: &[u64]) -> String {
    let mut md = String::new();
    for run in runs {
        md += &format!("## Seed {}\n\n{}\n", run.report.seed, run.markdown());
    }
    let (sim, real) = summaries(runs);
    md += &format!(
        "## Over the seeds\n\nThe simulator:\n\n{}",
        seeds::markdown(&sim, seeds, "virtual s")
    );
    if !real.is_empty() {
        md += &format!(
            "\nReal agents through the WAN emulator:\n\n{}",
            seeds::markdown(&real, seeds, "s")
        );
    }
    md
}
