//! `weightgrad bench`: every policy on the same data, seeds, regions and links in the
//! virtual-time WAN, plus a LAN-only reference (all workers in one region, no WAN) as the
//! speed limit; what each spends to reach a target accuracy, side by side.

pub mod plot;
pub mod real;

use crate::lan::RegionTrainer;
use crate::policies::{builtin, merge_mode_for};
use crate::sim::{EvalPoint, LinkDrop, SimConfig, SimReport, run, topology::Topology};
use crate::train::DataSplit;
use crate::train::dataset::ShardStrategy;
use crate::train::schedule::LrSchedule;
use anyhow::{Result, bail};
use serde::Serialize;
use weightgrad_sdk::LanPlan;

/// The scenarios `--scenario` knows.
pub const SCENARIOS: [&str; 5] = ["paper-3dc", "8dc", "asymmetric", "non-iid", "link-drop"];

/// Sets `cfg` up for scenario `name` (regions, links, sharding, faults).
pub fn apply_scenario(name: &str, cfg: &mut SimConfig) -> Result<()> {
    match name {
        // Three regions as in the WeightGrad paper: us-east, eu-west, ap-southeast,
        // 100 Mbit/s, RTT 80–230 ms, IID shards.
        "paper-3dc" => cfg.topology = Topology::default_for(3),
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

/// What one policy spent.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyResult {
    /// Policy name (`lan-only` for the reference).
    pub policy: String,
    /// Final top-1, lowest region.
    pub final_accuracy: f64,
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
    /// full-sync's WAN bytes to target over this policy's.
    pub wan_bytes_vs_full_sync: Option<f64>,
    /// full-sync's time to target over this policy's (speedup).
    pub speedup_vs_full_sync: Option<f64>,
    /// This policy's time to target over LAN-only's (1.0: as fast as one region).
    pub time_vs_lan_only: Option<f64>,
    /// Whole-run WAN bytes.
    pub wan_bytes: u64,
    /// Whole-run virtual seconds.
    pub virtual_seconds: f64,
    /// Evaluations: (WAN bytes, virtual seconds, lowest top-1).
    pub curve: Vec<EvalPoint>,
}

/// A bench run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Scenario name.
    pub scenario: String,
    /// Target top-1.
    pub target_accuracy: f64,
    /// Seed.
    pub seed: u64,
    /// Rounds per run.
    pub rounds: u64,
    /// Per policy, in the order asked, then `lan-only`.
    pub results: Vec<PolicyResult>,
}

fn result_from(policy: &str, report: &SimReport, target: f64) -> PolicyResult {
    let at = report.first_reaching(target);
    PolicyResult {
        policy: policy.to_string(),
        final_accuracy: report
            .regions
            .iter()
            .map(|r| r.test_accuracy)
            .fold(1.0, f64::min),
        reached_target: at.is_some(),
        wan_bytes_to_target: at.map(|p| p.wan_bytes),
        virtual_seconds_to_target: at.map(|p| p.virtual_seconds),
        lan_bytes_to_target: at.map(|p| p.lan_bytes),
        rounds_to_target: at.map(|p| p.round),
        wan_bytes_vs_full_sync: None,
        speedup_vs_full_sync: None,
        time_vs_lan_only: None,
        wan_bytes: report.wan_bytes,
        virtual_seconds: report.virtual_seconds,
        curve: report.curve.clone(),
    }
}

/// The speed limit: every region's workers in one region, no WAN, full-precision LAN,
/// the same shards, seeds, schedule and per-step compute cost as the simulated runs.
pub fn lan_only(cfg: &SimConfig, data: &DataSplit) -> Result<SimReport> {
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
    let schedule = LrSchedule::Cosine { min_factor: 0.0 };
    let mut curve = Vec::new();
    for round in 1..=total {
        let lr = schedule.lr_at(cfg.lr, round - 1, total);
        trainer.step(&LanPlan::FULL_PRECISION, lr)?;
        if round % steps_per_epoch == 0 || round == total {
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
    })
}

/// Runs `policies` (and the LAN-only reference) under `cfg`; `progress(policy)` is told
/// which run starts.
pub fn run_all(
    cfg: &SimConfig,
    scenario: &str,
    policies: &[String],
    target: f64,
    data: &DataSplit,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<BenchReport> {
    for p in policies {
        builtin(p).map_err(anyhow::Error::msg)?;
    }
    let mut results = Vec::new();
    let mut rounds = 0;
    for name in policies {
        let policy = builtin(name).map_err(anyhow::Error::msg)?;
        let mut c = cfg.clone();
        c.sync.merge = merge_mode_for(name);
        let report = run(&c, policy.as_ref(), data, &mut |done, total| {
            progress(name, done, total)
        })?;
        rounds = report.rounds;
        results.push(result_from(name, &report, target));
    }
    progress("lan-only", 0, 1);
    let reference = lan_only(cfg, data)?;
    results.push(result_from("lan-only", &reference, target));
    let full = results
        .iter()
        .find(|r| r.policy == "full-sync")
        .map(|r| (r.wan_bytes_to_target, r.virtual_seconds_to_target));
    let lan_time = results.last().and_then(|r| r.virtual_seconds_to_target);
    for r in &mut results {
        if let (Some((Some(fw), Some(ft))), Some(w), Some(t)) =
            (full, r.wan_bytes_to_target, r.virtual_seconds_to_target)
        {
            r.wan_bytes_vs_full_sync = (w > 0).then(|| fw as f64 / w as f64);
            r.speedup_vs_full_sync = (t > 0.0).then(|| ft / t);
        }
        if let (Some(l), Some(t)) = (lan_time, r.virtual_seconds_to_target) {
            r.time_vs_lan_only = (l > 0.0).then(|| t / l);
        }
    }
    Ok(BenchReport {
        scenario: scenario.to_string(),
        target_accuracy: target,
        seed: cfg.seed,
        rounds,
        results,
    })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "—".to_string(), |v| v.to_string())
}

/// The results as a Markdown table.
pub fn markdown(report: &BenchReport) -> String {
    let mut out = format!(
        "Scenario `{}`, target top-1 {:.1}% (lowest region), seed {}, {} rounds per run.\n\n\
         | policy | final top-1 | reached | WAN bytes to target | virtual s to target | LAN bytes to target | WAN bytes: full-sync / this | speedup vs full-sync | time vs LAN-only |\n\
         | --- | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        report.scenario,
        report.target_accuracy * 100.0,
        report.seed,
        report.rounds
    );
    for r in &report.results {
        out += &format!(
            "| {} | {:.2}% | {} | {} | {} | {} | {} | {} | {} |\n",
            r.policy,
            r.final_accuracy * 100.0,
            if r.reached_target { "yes" } else { "no" },
            opt(r.wan_bytes_to_target),
            opt(r.virtual_seconds_to_target.map(|v| format!("{v:.2}"))),
            opt(r.lan_bytes_to_target),
            opt(r.wan_bytes_vs_full_sync.map(|v| format!("{v:.1}×"))),
            opt(r.speedup_vs_full_sync.map(|v| format!("{v:.2}×"))),
            opt(r.time_vs_lan_only.map(|v| format!("{v:.2}×"))),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dataset::embedded_digits;

    #[test]
    fn scenarios_configure_the_run_and_unknown_ones_are_refused() {
        let mut c = SimConfig::demo(3, 0);
        apply_scenario("8dc", &mut c).unwrap();
        assert_eq!(c.topology.regions.len(), 8);
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

    #[test]
    fn a_short_bench_ranks_bytes_and_fills_the_ratios() {
        let data = embedded_digits().unwrap();
        let mut cfg = SimConfig::demo(2, 3);
        cfg.epochs = 2;
        let policies = vec!["full-sync".to_string(), "weightgrad".to_string()];
        let r = run_all(&cfg, "test", &policies, 0.5, &data, &mut |_, _, _| {}).unwrap();
        assert_eq!(r.results.len(), 3);
        assert_eq!(r.results[2].policy, "lan-only");
        assert_eq!(r.results[2].wan_bytes, 0);
        let full = &r.results[0];
        let wg = &r.results[1];
        assert!(full.reached_target && wg.reached_target);
        assert_eq!(full.wan_bytes_vs_full_sync, Some(1.0));
        assert!(wg.wan_bytes_vs_full_sync.unwrap() > 3.0, "{wg:?}");
        // Nothing beats one region with no WAN on time.
        assert!(full.time_vs_lan_only.unwrap() >= 1.0);
        let md = markdown(&r);
        assert!(md.contains("| weightgrad |") && md.contains("| lan-only |"));
    }
}
