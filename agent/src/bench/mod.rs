//! `weightgrad bench`: every policy on the same data, seeds, regions and links in the
//! virtual-time WAN, plus a LAN-only reference (all workers in one region, no WAN) as the
//! speed limit; what each spends to reach a target accuracy, side by side.

mod child_log;
pub mod peer;
pub mod plot;
pub mod real;
pub mod seeds;

use crate::lan::RegionTrainer;
use crate::policies::{builtin_or_variant, merge_mode_for};
use crate::sim::{EvalPoint, LinkDrop, SimConfig, SimReport, run, topology::Topology};
use crate::train::dataset::{DataSource, ShardStrategy};
use crate::train::schedule::LrSchedule;
use crate::train::{DataSplit, Model, ModelSpec};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use weightgrad_sdk::LanPlan;

/// The scenarios `--scenario` knows.
pub const SCENARIOS: [&str; 6] = [
    "paper-3dc",
    "ec2-3dc",
    "8dc",
    "asymmetric",
    "non-iid",
    "link-drop",
];

/// The `ec2-3dc` links: published AWS inter-region round trips (ms) and bandwidths
/// (Gbit/s) between N. Virginia, Ireland and Singapore, from the region table of DT-FM
/// (Yuan et al., "Decentralized Training of Foundation Models in Heterogeneous
/// Environments", NeurIPS 2022), as `(a, b, rtt_ms, gbit_s)`.
pub const EC2_3DC_LINKS: [(usize, usize, f64, f64); 3] = [
    (0, 1, 67.0, 1.05),
    (0, 2, 230.0, 0.364),
    (1, 2, 179.0, 0.492),
];

/// `ec2-3dc` divides the published bandwidths by this. Regions of GPUs step a
/// million-weight model in milliseconds, far less than its 4.5 MB update takes to cross
/// 0.36 Gbit/s (0.1 s); a CPU host steps it in a tenth of a second or more, so at the
/// published figures the host, not the WAN, would set full-sync's pace. A tenth of them
/// keeps the update slower to cross the thinnest link (1 s) than a step is to compute.
pub const EC2_3DC_BANDWIDTH_SCALE: f64 = 0.1;

/// Sets `cfg` up for scenario `name` (regions, links, sharding, faults).
pub fn apply_scenario(name: &str, cfg: &mut SimConfig) -> Result<()> {
    match name {
        // Three regions as in the WeightGrad paper: us-east, eu-west, ap-southeast,
        // 100 Mbit/s, RTT 80–230 ms, IID shards.
        "paper-3dc" => cfg.topology = Topology::default_for(3),
        // The same three regions with published per-pair round trips and (scaled)
        // bandwidths: a WAN that sets full-sync's pace on a model of a million weights.
        "ec2-3dc" => {
            cfg.topology = Topology::default_for(3);
            for (a, b, rtt_ms, gbit_s) in EC2_3DC_LINKS {
                for (from, to) in [(a, b), (b, a)] {
                    let link = &mut cfg.topology.links[from][to];
                    link.rtt_s = rtt_ms / 1e3;
                    link.bandwidth_bps = gbit_s * 1e9 * EC2_3DC_BANDWIDTH_SCALE;
                }
            }
        }
        // Eight regions, 150 ms between any two beyond the first three.
        "8dc" => cfg.topology = Topology::default_for(8),
        // One thin link: us-east ↔ ap-southeast at 10 Mbit/s.
        "asymmetric" => {
            cfg.topology = Topology::default_for(3);
            for (a, b) in [(0, 2), (2, 0)] {
                cfg.topology.links[a][b].bandwidth_bps = 10e6;
            }
        }
        // Label skew: each region sees mostly a few classes.
        "non-iid" => {
            cfg.topology = Topology::default_for(3);
            cfg.sharding = ShardStrategy::LabelSkew;
        }
        // us-east ↔ ap-southeast (the longest link) falls to 10% of its bandwidth a quarter
        // of the way through (before any policy reaches a high target).
        "link-drop" => {
            cfg.topology = Topology::default_for(3);
            cfg.link_drop = Some(LinkDrop {
                a: 0,
                b: 2,
                at_fraction: 0.25,
                factor: 0.1,
            });
        }
        other => bail!(
            "unknown scenario {other:?}; scenarios are {}",
            SCENARIOS.join(", ")
        ),
    }
    Ok(())
}

/// Multiplies every link's bandwidth in `cfg` by `factor` (`bench --bandwidth-scale`).
pub fn scale_bandwidth(cfg: &mut SimConfig, factor: f64) {
    for link in cfg.topology.links.iter_mut().flatten() {
        link.bandwidth_bps *= factor;
    }
}

/// The model a data set is benchmarked with unless another is named: the CIFAR CNN on
/// CIFAR-10, logistic regression on a CSV, the MLP on digits and other IDX image sets, the
/// default transformer (its context the window) on text.
pub fn default_model(source: &DataSource) -> ModelSpec {
    match source {
        DataSource::Text { window, .. } => ModelSpec::default_transformer(*window),
        DataSource::Cifar10 { .. } => ModelSpec::Cnn,
        DataSource::Csv { .. } => ModelSpec::Logreg,
        DataSource::Digits | DataSource::Idx { .. } => ModelSpec::default_mlp(),
    }
}

/// What every run of a bench shares: data set, model, compute cost and staleness bound.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSetup {
    /// The data set (`digits`, or the kind and path given).
    pub dataset: String,
    /// The model as `--model` spells it.
    pub model: String,
    /// The model's layer widths, as its manifest names it (e.g. `mlp[64-256-10]`).
    pub architecture: String,
    /// Trainable parameters.
    pub params: usize,
    /// Bytes of one full fp32 copy of the parameters.
    pub fp32_bytes: usize,
    /// Virtual seconds one training step costs.
    pub compute_seconds_per_step: f64,
    /// The staleness bounds every policy runs at.
    pub staleness_bounds: Vec<u64>,
    /// Whether the model is a language model (its rows then report perplexity).
    pub language_model: bool,
}

impl BenchSetup {
    /// Describes `cfg.model` on `data` (builds the model once to count its parameters),
    /// run at each of `staleness_bounds`.
    pub fn describe(
        cfg: &SimConfig,
        dataset: &str,
        data: &DataSplit,
        staleness_bounds: &[u64],
    ) -> Result<Self> {
        let model = Model::new(
            &cfg.model,
            &data.train.sample_shape,
            data.train.classes,
            cfg.seed,
            &candle_core::Device::Cpu,
        )?;
        let params = model.manifest().params();
        Ok(Self {
            dataset: dataset.to_string(),
            model: cfg.model.to_string(),
            architecture: model.manifest().model.clone(),
            params,
            fp32_bytes: params * 4,
            compute_seconds_per_step: cfg.compute_s,
            staleness_bounds: staleness_bounds.to_vec(),
            language_model: cfg.model.is_language_model(),
        })
    }
}

/// What one policy spent.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyResult {
    /// Policy name (`lan-only` for the reference), followed by its bound when the bench
    /// runs several, e.g. `weightgrad (bound 4)`.
    pub policy: String,
    /// The staleness bound this run used (none for LAN-only, which has no WAN).
    pub max_staleness: Option<u64>,
    /// Final top-1, lowest region (per token for a language model).
    pub final_accuracy: f64,
    /// Final test loss, highest region (per token for a language model; its perplexity is
    /// `exp` of it).
    pub final_loss: f64,
    /// This run's final perplexity over full-sync's at the same bound (language models).
    pub perplexity_vs_full_sync: Option<f64>,
    /// full-sync's whole-run WAN bytes (same bound, same number of rounds) over this run's:
    /// the saving at equal steps.
    pub whole_run_wan_bytes_vs_full_sync: Option<f64>,
    /// Whether every region reached the target at some evaluation.
    pub reached_target: bool,
    /// WAN bytes spent by the first evaluation at which every region had the target.
    pub wan_bytes_to_target: Option<u64>,
    /// Virtual seconds to that evaluation.
    pub virtual_seconds_to_target: Option<f64>,
    /// LAN bytes to that evaluation.
    pub lan_bytes_to_target: Option<u64>,
    /// Rounds to that evaluation.
    pub rounds_to_target: Option<u64>,
    /// full-sync's WAN bytes to target (at the same bound) over this policy's.
    pub wan_bytes_vs_full_sync: Option<f64>,
    /// full-sync's time to target (at the same bound) over this policy's (speedup).
    pub speedup_vs_full_sync: Option<f64>,
    /// The time to target of the full-sync run that got there first, over any bound,
    /// over this policy's: the speedup against full-sync at its best bound.
    pub speedup_vs_fastest_full_sync: Option<f64>,
    /// This policy's time to target over LAN-only's (1.0: as fast as one region).
    pub time_vs_lan_only: Option<f64>,
    /// The full-sync row the `*_vs_full_sync` ratios compare with: full-sync at the same
    /// bound, or for LAN-only the full-sync run that reached the target first.
    pub full_sync_baseline: Option<String>,
    /// Whole-run WAN bytes.
    pub wan_bytes: u64,
    /// Whole-run virtual seconds.
    pub virtual_seconds: f64,
    /// Mean rounds a peer's delivered rounds were behind a region's finished ones when
    /// its steps started: the staleness the run trained at ([`SimReport::rounds_behind_mean`]).
    pub rounds_behind_mean: f64,
    /// Evaluations: (WAN bytes, virtual seconds, lowest top-1).
    pub curve: Vec<EvalPoint>,
}

/// A bench run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Scenario name.
    pub scenario: String,
    /// Data set, model and compute cost.
    pub setup: BenchSetup,
    /// Target top-1 (with a full-sync target, full-sync's final top-1 at the first bound).
    pub target_accuracy: f64,
    /// Whether the target is full-sync's final top-1 (at each run's bound) rather than fixed.
    pub target_is_full_sync_final: bool,
    /// Seed.
    pub seed: u64,
    /// Rounds per run.
    pub rounds: u64,
    /// Per policy in the order asked, each at every bound in order, then `lan-only`.
    pub results: Vec<PolicyResult>,
}

fn result_from(policy: &str, report: &SimReport, target: f64) -> PolicyResult {
    let at = report.first_reaching(target);
    PolicyResult {
        policy: policy.to_string(),
        max_staleness: None,
        final_accuracy: report.lowest_accuracy(),
        final_loss: report
            .regions
            .iter()
            .map(|r| r.test_loss)
            .fold(f64::NEG_INFINITY, f64::max),
        perplexity_vs_full_sync: None,
        whole_run_wan_bytes_vs_full_sync: None,
        reached_target: at.is_some(),
        wan_bytes_to_target: at.map(|p| p.wan_bytes),
        virtual_seconds_to_target: at.map(|p| p.virtual_seconds),
        lan_bytes_to_target: at.map(|p| p.lan_bytes),
        rounds_to_target: at.map(|p| p.round),
        wan_bytes_vs_full_sync: None,
        speedup_vs_full_sync: None,
        speedup_vs_fastest_full_sync: None,
        time_vs_lan_only: None,
        full_sync_baseline: None,
        wan_bytes: report.wan_bytes,
        virtual_seconds: report.virtual_seconds,
        rounds_behind_mean: report.rounds_behind_mean,
        curve: report.curve.clone(),
    }
}

/// The speed limit: every region's workers in one region, no WAN, full-precision LAN,
/// the same shards, seeds, schedule and per-step compute cost as the simulated runs.
pub fn lan_only(cfg: &SimConfig, data: &DataSplit) -> Result<SimReport> {
    if cfg.workers == 0 || cfg.batch_size == 0 {
        bail!("workers and batch size must be positive");
    }
    let layout = cfg.layout();
    let shards = (0..layout.regions)
        .flat_map(|r| layout.worker_shards(&data.train.labels, r))
        .map(|idx| data.train.subset(&idx))
        .collect();
    let mut trainer = RegionTrainer::new(
        "lan-only",
        &cfg.model,
        shards,
        data.train.classes,
        cfg.batch_size,
        cfg.seed,
        cfg.seed,
    )?;
    // As many rounds as the WAN runs make: the same samples per region-step.
    let steps_per_epoch = layout.steps_per_epoch(&data.train.labels);
    let total = steps_per_epoch * cfg.epochs as u64;
    let evaluate_every = cfg.evaluation_interval(steps_per_epoch);
    let schedule = LrSchedule::Cosine { min_factor: 0.0 };
    let mut curve = Vec::new();
    for round in 1..=total {
        let lr = schedule.lr_at(cfg.lr, round - 1, total);
        trainer.step(&LanPlan::FULL_PRECISION, lr)?;
        if round % evaluate_every == 0 || round == total {
            let e = trainer.evaluate(&data.test)?;
            curve.push(EvalPoint {
                round,
                virtual_seconds: round as f64 * cfg.compute_s,
                wan_bytes: 0,
                lan_bytes: trainer.lan_bytes(),
                min_accuracy: e.accuracy,
            });
        }
    }
    let e = trainer.evaluate(&data.test)?;
    Ok(SimReport {
        policy: "lan-only".into(),
        regions: vec![crate::sim::RegionReport {
            name: "lan-only".into(),
            test_accuracy: e.accuracy,
            test_loss: e.loss,
        }],
        wan_bytes: 0,
        lan_bytes: trainer.lan_bytes(),
        virtual_seconds: total as f64 * cfg.compute_s,
        rounds: total,
        curve,
        rejected: 0,
        rounds_behind_mean: 0.0,
        rounds_behind_max: 0,
        busiest_link_busy_share: 0.0,
    })
}

/// The accuracy a run's time and bytes to target are measured to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BenchTarget {
    /// This top-1 (a fraction) in every region.
    Accuracy(f64),
    /// The final top-1 (lowest region) of full-sync at the same bound in the same run:
    /// what it costs each policy to match full-sync's result. LAN-only is measured to the
    /// first bound's.
    FullSyncFinal,
}

impl std::str::FromStr for BenchTarget {
    type Err = String;

    /// A fraction in `0..=1`, or `full-sync`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "full-sync" {
            return Ok(Self::FullSyncFinal);
        }
        match s.parse::<f64>() {
            Ok(t) if (0.0..=1.0).contains(&t) => Ok(Self::Accuracy(t)),
            _ => Err(format!(
                "{s:?} is neither a fraction in 0..=1 nor full-sync (its final top-1)"
            )),
        }
    }
}

/// What a bench compares: which policies, at which staleness bounds, to which target.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Scenario name (for the report; `cfg` already holds its regions and links).
    pub scenario: String,
    /// Policies to run, in report order; `full-sync` gives the ratios.
    pub policies: Vec<String>,
    /// Every policy runs once at each of these bounds (rounds a region may run ahead of
    /// the slowest peer).
    pub staleness_bounds: Vec<u64>,
    /// Top-1 every region must reach.
    pub target: BenchTarget,
    /// Runs at a time. Each run is deterministic and independent of the others, so the
    /// figures do not depend on this.
    pub jobs: usize,
}

/// One simulation of a bench: a policy at a bound, or the LAN-only reference.
#[derive(Debug, Clone)]
struct Job {
    policy: String,
    bound: Option<u64>,
}

impl Job {
    fn label(&self, several_bounds: bool) -> String {
        match self.bound {
            Some(b) if several_bounds => format!("{} (bound {b})", self.policy),
            _ => self.policy.clone(),
        }
    }
}

/// Runs every policy of `plan` at every bound, and the LAN-only reference, under `cfg`;
/// `progress(run, done, total)` sees each run's rounds as they finish (from several
/// threads when `plan.jobs > 1`).
pub fn run_all(
    cfg: &SimConfig,
    plan: &BenchPlan,
    setup: BenchSetup,
    data: &DataSplit,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<BenchReport> {
    for p in &plan.policies {
        builtin_or_variant(p).map_err(anyhow::Error::msg)?;
    }
    if plan.staleness_bounds.is_empty() {
        bail!("a bench needs at least one staleness bound");
    }
    let several = plan.staleness_bounds.len() > 1;
    let mut jobs: Vec<Job> = plan
        .policies
        .iter()
        .flat_map(|p| {
            plan.staleness_bounds.iter().map(|&b| Job {
                policy: p.clone(),
                bound: Some(b),
            })
        })
        .collect();
    jobs.push(Job {
        policy: "lan-only".into(),
        bound: None,
    });
    let run_job = |job: &Job| -> Result<SimReport> {
        let label = job.label(several);
        let Some(bound) = job.bound else {
            progress(&label, 0, 1);
            return lan_only(cfg, data);
        };
        let policy = builtin_or_variant(&job.policy).map_err(anyhow::Error::msg)?;
        let mut c = cfg.clone();
        c.sync.merge = merge_mode_for(&job.policy);
        c.sync.max_staleness = bound;
        run(&c, policy.as_ref(), data, &mut |done, total| {
            progress(&label, done, total)
        })
        .with_context(|| label.clone())
    };
    let reports = run_parallel(&jobs, plan.jobs, &run_job)?;
    let rounds = reports.first().map_or(0, |r| r.rounds);
    // Each run's target: fixed, or full-sync's final top-1 at the run's bound.
    let full_sync_final = |bound: Option<u64>| {
        let bound = bound.or(plan.staleness_bounds.first().copied());
        jobs.iter()
            .zip(&reports)
            .find(|(j, _)| j.policy == "full-sync" && j.bound == bound)
            .map(|(_, r)| r.lowest_accuracy())
    };
    let target_of = |job: &Job| -> Result<f64> {
        match plan.target {
            BenchTarget::Accuracy(t) => Ok(t),
            BenchTarget::FullSyncFinal => full_sync_final(job.bound)
                .context("the target full-sync needs full-sync among the policies"),
        }
    };
    let mut results: Vec<PolicyResult> = jobs
        .iter()
        .zip(&reports)
        .map(|(job, report)| {
            let mut r = result_from(&job.label(several), report, target_of(job)?);
            r.max_staleness = job.bound;
            Ok(r)
        })
        .collect::<Result<_>>()?;
    fill_ratios(&mut results, &jobs);
    let lan_only = jobs.last().expect("the LAN-only job is always there");
    Ok(BenchReport {
        scenario: plan.scenario.clone(),
        setup,
        target_accuracy: target_of(lan_only)?,
        target_is_full_sync_final: plan.target == BenchTarget::FullSyncFinal,
        seed: cfg.seed,
        rounds,
        results,
    })
}

/// Runs `work` on every job, `threads` at a time, and returns the reports in job order;
/// after a failure no further job starts, and the first failure is returned.
fn run_parallel(
    jobs: &[Job],
    threads: usize,
    work: &(dyn Fn(&Job) -> Result<SimReport> + Sync),
) -> Result<Vec<SimReport>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<SimReport>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let outcome = work(job);
                    if outcome.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    *slots[i]
                        .lock()
                        .expect("no job panics while holding its slot") = Some(outcome);
                }
            });
        }
    });
    let mut reports = Vec::with_capacity(jobs.len());
    for slot in slots {
        match slot
            .into_inner()
            .expect("no job panics while holding its slot")
        {
            Some(Ok(r)) => reports.push(r),
            Some(Err(e)) => return Err(e),
            // Not started because another job failed; that failure comes first or later.
            None => {}
        }
    }
    if reports.len() < jobs.len() {
        bail!("a bench run failed before every run had started");
    }
    Ok(reports)
}

/// Fills each result's ratios: against full-sync at the same bound, against the
/// full-sync run that reached the target first (over every bound), and against LAN-only.
fn fill_ratios(results: &mut [PolicyResult], jobs: &[Job]) {
    let to_target = |r: &PolicyResult| r.wan_bytes_to_target.zip(r.virtual_seconds_to_target);
    let full_sync = || {
        jobs.iter()
            .zip(results.iter())
            .filter(|(j, _)| j.policy == "full-sync")
    };
    let fastest_full = full_sync()
        .filter_map(|(_, r)| Some((r, to_target(r)?)))
        .min_by(|a, b| a.1.1.total_cmp(&b.1.1));
    // Each row's full-sync baseline (its name, its bytes and time to target if it got
    // there, its final loss and its whole-run bytes): at the row's bound, or the fastest for
    // LAN-only.
    type Baseline = (String, Option<(u64, f64)>, f64, u64);
    let baselines: Vec<Option<Baseline>> =
        jobs.iter()
            .map(|j| match j.bound {
                Some(b) => full_sync()
                    .find(|(f, _)| f.bound == Some(b))
                    .map(|(_, r)| (r.policy.clone(), to_target(r), r.final_loss, r.wan_bytes)),
                None => fastest_full
                    .map(|(r, at)| (r.policy.clone(), Some(at), r.final_loss, r.wan_bytes)),
            })
            .collect();
    let fastest_full = fastest_full.map(|(_, at)| at);
    let lan_time = jobs
        .iter()
        .zip(results.iter())
        .find(|(j, _)| j.bound.is_none())
        .and_then(|(_, r)| r.virtual_seconds_to_target);
    for (r, baseline) in results.iter_mut().zip(baselines) {
        let full = baseline.as_ref().and_then(|(_, at, _, _)| *at);
        if let Some((_, _, loss, bytes)) = &baseline {
            r.perplexity_vs_full_sync = Some((r.final_loss - loss).exp());
            r.whole_run_wan_bytes_vs_full_sync =
                (r.wan_bytes > 0).then(|| *bytes as f64 / r.wan_bytes as f64);
        }
        r.full_sync_baseline = baseline.map(|(name, _, _, _)| name);
        let Some((w, t)) = to_target(r) else { continue };
        if let Some((fw, ft)) = full {
            r.wan_bytes_vs_full_sync = (w > 0).then(|| fw as f64 / w as f64);
            r.speedup_vs_full_sync = (t > 0.0).then(|| ft / t);
        }
        if let Some((_, ft)) = fastest_full {
            r.speedup_vs_fastest_full_sync = (t > 0.0).then(|| ft / t);
        }
        if let Some(l) = lan_time {
            r.time_vs_lan_only = (l > 0.0).then(|| t / l);
        }
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "—".to_string(), |v| v.to_string())
}

/// The results as a Markdown table.
pub fn markdown(report: &BenchReport) -> String {
    let w = &report.setup;
    let several = w.staleness_bounds.len() > 1;
    let bounds: Vec<String> = w.staleness_bounds.iter().map(ToString::to_string).collect();
    let mut out = format!(
        "Scenario `{}` on {}, model `{}` ({}, {} parameters, {} bytes in fp32), {:.1} ms of \
         virtual compute per step, staleness {} {}; target top-1 {} (lowest region), seed {}, \
         {} rounds per run.\n\n\
         | policy | final top-1 | reached | rounds to target | WAN bytes to target | virtual s to target | LAN bytes to target | WAN bytes: full-sync / this | speedup vs full-sync |{} time vs LAN-only |\n\
         | --- | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |{} ---: |\n",
        report.scenario,
        w.dataset,
        w.model,
        w.architecture,
        w.params,
        w.fp32_bytes,
        w.compute_seconds_per_step * 1e3,
        if several { "bounds" } else { "bound" },
        bounds.join(", "),
        if report.target_is_full_sync_final {
            format!(
                "full-sync's final, {:.2}%{}",
                report.target_accuracy * 100.0,
                if several { " at the first bound" } else { "" }
            )
        } else {
            format!("{:.1}%", report.target_accuracy * 100.0)
        },
        report.seed,
        report.rounds,
        if several {
            " speedup vs fastest full-sync |"
        } else {
            ""
        },
        if several { " ---: |" } else { "" },
    );
    if w.language_model {
        // Perplexity columns after the policy's name (top-1 is then per next token).
        out = out.replacen(
            "| policy | final top-1 |",
            "| policy | final perplexity | perplexity: this / full-sync | whole-run WAN bytes: \
             full-sync / this | final top-1 (next token) |",
            1,
        );
        out = out.replacen("| --- | ---: |", "| --- | ---: | ---: | ---: | ---: |", 1);
    }
    let ratio = |v: Option<f64>, digits: usize| opt(v.map(|v| format!("{v:.digits$}×")));
    for r in &report.results {
        let fastest = if several {
            format!(" {} |", ratio(r.speedup_vs_fastest_full_sync, 2))
        } else {
            String::new()
        };
        let perplexity = if w.language_model {
            format!(
                " {:.3} | {} | {} |",
                r.final_loss.exp(),
                opt(r.perplexity_vs_full_sync.map(|v| format!("{v:.4}"))),
                ratio(r.whole_run_wan_bytes_vs_full_sync, 1)
            )
        } else {
            String::new()
        };
        out += &format!(
            "| {} |{perplexity} {:.2}% | {} | {} | {} | {} | {} | {} | {} |{fastest} {} |\n",
            r.policy,
            r.final_accuracy * 100.0,
            if r.reached_target { "yes" } else { "no" },
            opt(r.rounds_to_target),
            opt(r.wan_bytes_to_target),
            opt(r.virtual_seconds_to_target.map(|v| format!("{v:.2}"))),
            opt(r.lan_bytes_to_target),
            ratio(r.wan_bytes_vs_full_sync, 1),
            ratio(r.speedup_vs_full_sync, 2),
            ratio(r.time_vs_lan_only, 2),
        );
    }
    if several {
        out += "\nRatios against full-sync are at the same bound; \"fastest full-sync\" is the \
                full-sync run that reached the target first, over every bound.\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::builtin;
    use crate::train::dataset::embedded_digits;

    #[test]
    fn scenarios_configure_the_run_and_unknown_ones_are_refused() {
        let mut c = SimConfig::demo(3, 0);
        apply_scenario("8dc", &mut c).unwrap();
        assert_eq!(c.topology.regions.len(), 8);
        apply_scenario("ec2-3dc", &mut c).unwrap();
        assert_eq!(c.topology.regions.len(), 3);
        // us-east <-> ap-southeast: 230 ms, 36.4 Mbit/s, both ways.
        for (a, b) in [(0, 2), (2, 0)] {
            let l = c.topology.link(a, b);
            assert_eq!(l.rtt_s, 0.230);
            assert!((l.bandwidth_bps - 36.4e6).abs() < 1.0, "{l:?}");
        }
        assert_eq!(c.topology.link(1, 2).rtt_s, 0.179);
        scale_bandwidth(&mut c, 0.5);
        assert!((c.topology.link(0, 2).bandwidth_bps - 18.2e6).abs() < 1.0);
        assert_eq!(c.topology.link(1, 2).rtt_s, 0.179);
        apply_scenario("asymmetric", &mut c).unwrap();
        assert_eq!(c.topology.links[0][2].bandwidth_bps, 10e6);
        assert_eq!(c.topology.links[0][1].bandwidth_bps, 100e6);
        apply_scenario("non-iid", &mut c).unwrap();
        assert_eq!(c.sharding, ShardStrategy::LabelSkew);
        apply_scenario("link-drop", &mut c).unwrap();
        assert_eq!(c.link_drop.unwrap().factor, 0.1);
        let err = apply_scenario("moon", &mut c).unwrap_err().to_string();
        assert!(err.contains("paper-3dc"), "{err}");
    }

    #[test]
    fn a_link_drop_slows_a_bandwidth_hungry_run() {
        let data = embedded_digits().unwrap();
        let mut cfg = SimConfig::demo(3, 1);
        cfg.epochs = 2;
        let policy = builtin("full-sync").unwrap();
        let steady = run(&cfg, policy.as_ref(), &data, &mut |_, _| {}).unwrap();
        apply_scenario("link-drop", &mut cfg).unwrap();
        cfg.link_drop.as_mut().unwrap().factor = 0.01;
        let dropped = run(&cfg, policy.as_ref(), &data, &mut |_, _| {}).unwrap();
        assert!(
            dropped.virtual_seconds > steady.virtual_seconds * 1.2,
            "{} vs {}",
            dropped.virtual_seconds,
            steady.virtual_seconds
        );
    }

    fn plan(policies: &[&str], bounds: &[u64], jobs: usize) -> BenchPlan {
        BenchPlan {
            scenario: "test".into(),
            policies: policies.iter().map(|p| p.to_string()).collect(),
            staleness_bounds: bounds.to_vec(),
            target: BenchTarget::Accuracy(0.5),
            jobs,
        }
    }

    #[test]
    fn a_short_bench_ranks_bytes_and_fills_the_ratios() {
        let data = embedded_digits().unwrap();
        let mut cfg = SimConfig::demo(2, 3);
        cfg.epochs = 2;
        let setup = BenchSetup::describe(&cfg, "digits", &data, &[1]).unwrap();
        assert_eq!(
            (setup.params, setup.architecture.as_str()),
            (64 * 256 + 256 + 256 * 10 + 10, "mlp[64-256-10]")
        );
        let p = plan(&["full-sync", "weightgrad"], &[1], 1);
        let r = run_all(&cfg, &p, setup, &data, &|_, _, _| {}).unwrap();
        assert_eq!(r.results.len(), 3);
        assert_eq!(r.results[2].policy, "lan-only");
        assert_eq!(r.results[2].wan_bytes, 0);
        assert_eq!(r.results[2].max_staleness, None);
        let full = &r.results[0];
        let wg = &r.results[1];
        assert_eq!(wg.max_staleness, Some(1));
        assert!(full.reached_target && wg.reached_target);
        assert_eq!(full.wan_bytes_vs_full_sync, Some(1.0));
        assert!(wg.wan_bytes_vs_full_sync.unwrap() > 3.0, "{wg:?}");
        assert_eq!(wg.speedup_vs_full_sync, wg.speedup_vs_fastest_full_sync);
        // Nothing beats one region with no WAN on time.
        assert!(full.time_vs_lan_only.unwrap() >= 1.0);
        let md = markdown(&r);
        assert!(md.contains("| weightgrad |") && md.contains("| lan-only |"));
        assert!(
            md.contains("model `mlp:256` (mlp[64-256-10], 19210 parameters"),
            "{md}"
        );
        assert!(md.contains("staleness bound 1;"), "{md}");
        assert!(!md.contains("fastest full-sync"), "{md}");

        // To full-sync's own final top-1: full-sync gets there at its last evaluation.
        let mut p = plan(&["full-sync", "weightgrad"], &[1], 1);
        p.target = BenchTarget::FullSyncFinal;
        let setup = BenchSetup::describe(&cfg, "digits", &data, &[1]).unwrap();
        let to_final = run_all(&cfg, &p, setup, &data, &|_, _, _| {}).unwrap();
        let full = &to_final.results[0];
        assert_eq!(to_final.target_accuracy, full.final_accuracy);
        assert!(full.reached_target);
        assert!(markdown(&to_final).contains("target top-1 full-sync's final, "));
        let refused = run_all(
            &cfg,
            &BenchPlan {
                policies: vec!["weightgrad".into()],
                ..p
            },
            BenchSetup::describe(&cfg, "digits", &data, &[1]).unwrap(),
            &data,
            &|_, _, _| {},
        );
        assert!(
            refused.unwrap_err().to_string().contains("needs full-sync"),
            "a full-sync target without full-sync is refused"
        );
        assert_eq!(
            "full-sync".parse::<BenchTarget>(),
            Ok(BenchTarget::FullSyncFinal)
        );
        assert!("1.5".parse::<BenchTarget>().is_err());
    }

    #[test]
    fn several_bounds_run_every_policy_at_each_and_jobs_do_not_change_the_figures() {
        let data = embedded_digits().unwrap();
        let mut cfg = SimConfig::demo(2, 5);
        cfg.epochs = 2;
        let setup = BenchSetup::describe(&cfg, "digits", &data, &[0, 3]).unwrap();
        let p = plan(&["full-sync", "gaia"], &[0, 3], 2);
        let r = run_all(&cfg, &p, setup.clone(), &data, &|_, _, _| {}).unwrap();
        let labels: Vec<(&str, Option<u64>)> = r
            .results
            .iter()
            .map(|x| (x.policy.as_str(), x.max_staleness))
            .collect();
        assert_eq!(
            labels,
            [
                ("full-sync (bound 0)", Some(0)),
                ("full-sync (bound 3)", Some(3)),
                ("gaia (bound 0)", Some(0)),
                ("gaia (bound 3)", Some(3)),
                ("lan-only", None),
            ]
        );
        // A looser bound lets regions wait less.
        assert!(r.results[1].virtual_seconds < r.results[0].virtual_seconds);
        // Each ratio is against full-sync at the same bound; the fastest full-sync is the
        // one that reached the target first.
        let t = |i: usize| r.results[i].virtual_seconds_to_target.unwrap();
        assert_eq!(r.results[0].speedup_vs_full_sync, Some(1.0));
        assert_eq!(r.results[3].speedup_vs_full_sync, Some(t(1) / t(3)));
        assert_eq!(
            r.results[2].speedup_vs_fastest_full_sync,
            Some(t(0).min(t(1)) / t(2))
        );
        let md = markdown(&r);
        assert!(md.contains("staleness bounds 0, 3;"), "{md}");
        assert!(md.contains("speedup vs fastest full-sync"), "{md}");
        // One run at a time gives the same figures, byte for byte.
        let serial = run_all(
            &cfg,
            &plan(&["full-sync", "gaia"], &[0, 3], 1),
            setup,
            &data,
            &|_, _, _| {},
        )
        .unwrap();
        for (a, b) in r.results.iter().zip(&serial.results) {
            assert_eq!(
                (a.wan_bytes, a.virtual_seconds, a.final_accuracy),
                (b.wan_bytes, b.virtual_seconds, b.final_accuracy),
                "{}",
                a.policy
            );
        }
    }

    #[test]
    fn a_failing_run_fails_the_bench_and_names_itself() {
        let data = embedded_digits().unwrap();
        let mut cfg = SimConfig::demo(2, 5);
        cfg.epochs = 1;
        cfg.batch_size = 0;
        let setup = BenchSetup::describe(&cfg, "digits", &data, &[1]).unwrap();
        let err = run_all(
            &cfg,
            &plan(&["gaia"], &[1], 2),
            setup.clone(),
            &data,
            &|_, _, _| {},
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("gaia"), "{err:#}");
        let err = run_all(&cfg, &plan(&["gaia"], &[], 1), setup, &data, &|_, _, _| {}).unwrap_err();
        assert!(err.to_string().contains("staleness bound"), "{err}");
    }
}
