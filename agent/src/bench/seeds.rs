//! One bench over several seeds: each policy's mean and spread of final top-1, of its time
//! and bytes to the target, and of its ratios to full-sync, seed by seed in the same run.

use super::BenchReport;
use super::peer::PeerRun;
use super::real::RealCheck;
use serde::Serialize;

/// Mean, sample standard deviation and range of some values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1); 0 for a single value.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// The spread of `values`; none when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self {
            mean,
            std,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n,
        })
    }
}

/// One policy's run under one seed, as the summary reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRow {
    /// The row's name (a policy, with its bound when the bench runs several).
    pub policy: String,
    /// The full-sync row of the same seed (and bound) it is compared with.
    pub baseline: Option<String>,
    /// Final top-1, lowest region.
    pub final_accuracy: f64,
    /// Seconds (virtual or real) to the target, if reached.
    pub seconds_to_target: Option<f64>,
    /// WAN bytes to the target, if reached.
    pub wan_bytes_to_target: Option<u64>,
    /// A language model's final test loss per token, highest region (none for classifiers).
    pub final_loss: Option<f64>,
    /// WAN bytes over the whole run (none where not recorded).
    pub wan_bytes: Option<u64>,
}

/// A simulated bench's rows, each with the full-sync row its own ratios compare with.
pub fn rows_of_report(report: &BenchReport) -> Vec<SeedRow> {
    report
        .results
        .iter()
        .map(|r| SeedRow {
            policy: r.policy.clone(),
            baseline: r.full_sync_baseline.clone(),
            final_accuracy: r.final_accuracy,
            seconds_to_target: r.virtual_seconds_to_target,
            wan_bytes_to_target: r.wan_bytes_to_target,
            final_loss: report.setup.language_model.then_some(r.final_loss),
            wan_bytes: Some(r.wan_bytes),
        })
        .collect()
}

/// Real agents' rows, then the peers' (other systems on the same links), each with the
/// real full-sync run (when there is one) as the baseline.
pub fn rows_of_real(checks: &[RealCheck], peers: &[PeerRun]) -> Vec<SeedRow> {
    let baseline = checks
        .iter()
        .any(|c| c.policy == "full-sync")
        .then(|| "full-sync".to_string());
    let agents = checks.iter().map(|c| SeedRow {
        policy: c.policy.clone(),
        baseline: baseline.clone(),
        final_accuracy: c.real_accuracy,
        seconds_to_target: c.real_seconds_to_target,
        wan_bytes_to_target: c.real_wan_bytes_to_target,
        final_loss: None,
        wan_bytes: Some(c.real_wan_bytes),
    });
    let peers = peers.iter().map(|p| SeedRow {
        policy: p.name.clone(),
        baseline: baseline.clone(),
        final_accuracy: p.result.final_accuracy,
        seconds_to_target: p.seconds_to_target,
        wan_bytes_to_target: p.wan_bytes_to_target,
        final_loss: None,
        wan_bytes: Some(p.result.wan_bytes),
    });
    agents.chain(peers).collect()
}

/// One policy over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedSummary {
    /// The row's name.
    pub policy: String,
    /// Seeds it ran under.
    pub seeds: usize,
    /// Seeds under which it reached the target.
    pub reached: usize,
    /// Final top-1.
    pub final_accuracy: Spread,
    /// Its final top-1 minus full-sync's, seed by seed (a fraction: 0.01 is a point).
    pub accuracy_vs_full_sync: Option<Spread>,
    /// Seconds to the target, over the seeds that reached it.
    pub seconds_to_target: Option<Spread>,
    /// WAN bytes to the target, over the seeds that reached it.
    pub wan_bytes_to_target: Option<Spread>,
    /// full-sync's WAN bytes to target over this one's, seed by seed where both reached it.
    pub wan_bytes_vs_full_sync: Option<Spread>,
    /// full-sync's time to target over this one's, seed by seed where both reached it.
    pub speedup_vs_full_sync: Option<Spread>,
    /// A language model's final validation perplexity.
    pub final_perplexity: Option<Spread>,
    /// Its final perplexity over full-sync's, seed by seed.
    pub perplexity_vs_full_sync: Option<Spread>,
    /// full-sync's whole-run WAN bytes over this one's, seed by seed.
    pub whole_run_wan_bytes_vs_full_sync: Option<Spread>,
}

/// Each row name's summary over the seeds (`per_seed[i]` holds seed i's rows), in the
/// first seed's order.
pub fn summarize(per_seed: &[Vec<SeedRow>]) -> Vec<SeedSummary> {
    let Some(first) = per_seed.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|row| {
            let runs: Vec<(&SeedRow, Option<&SeedRow>)> = per_seed
                .iter()
                .filter_map(|rows| {
                    let this = rows.iter().find(|r| r.policy == row.policy)?;
                    let base = this
                        .baseline
                        .as_ref()
                        .and_then(|b| rows.iter().find(|r| &r.policy == b));
                    Some((this, base))
                })
                .collect();
            let values = |f: &dyn Fn(&SeedRow, Option<&SeedRow>) -> Option<f64>| {
                runs.iter()
                    .filter_map(|(this, base)| f(this, *base))
                    .collect::<Vec<f64>>()
            };
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let bytes = |r: &SeedRow| r.wan_bytes_to_target.map(|b| b as f64);
            SeedSummary {
                policy: row.policy.clone(),
                seeds: runs.len(),
                reached: runs
                    .iter()
                    .filter(|(r, _)| r.seconds_to_target.is_some())
                    .count(),
                final_accuracy: Spread::of(&values(&|r, _| Some(r.final_accuracy)))
                    .expect("the first seed has this row"),
                accuracy_vs_full_sync: Spread::of(&values(&|r, b| {
                    b.map(|b| r.final_accuracy - b.final_accuracy)
                })),
                seconds_to_target: Spread::of(&values(&|r, _| r.seconds_to_target)),
                wan_bytes_to_target: Spread::of(&values(&|r, _| bytes(r))),
                wan_bytes_vs_full_sync: Spread::of(&values(&|r, b| {
                    ratio(b.and_then(bytes), bytes(r))
                })),
                speedup_vs_full_sync: Spread::of(&values(&|r, b| {
                    ratio(b.and_then(|b| b.seconds_to_target), r.seconds_to_target)
                })),
                final_perplexity: Spread::of(&values(&|r, _| r.final_loss.map(f64::exp))),
                perplexity_vs_full_sync: Spread::of(&values(&|r, b| {
                    Some((r.final_loss? - b?.final_loss?).exp())
                })),
                whole_run_wan_bytes_vs_full_sync: Spread::of(&values(&|r, b| {
                    let whole = |r: &SeedRow| r.wan_bytes.map(|b| b as f64);
                    ratio(b.and_then(whole), whole(r))
                })),
            }
        })
        .collect()
}

/// The summaries as a Markdown table; `clock` names the seconds (`virtual s`, `s`).
pub fn markdown(summaries: &[SeedSummary], seeds: &[u64], clock: &str) -> String {
    let list: Vec<String> = seeds.iter().map(ToString::to_string).collect();
    let mut out = format!(
        "Over seeds {} (mean ± sample standard deviation; ratios are taken seed by seed \
         against full-sync of the same seed, where both reached the target):\n\n\
         | policy | reached | final top-1 | top-1 − full-sync, points | {clock} to target | \
         WAN bytes to target | WAN bytes: full-sync / this | speedup vs full-sync |\n\
         | --- | :---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        list.join(", ")
    );
    for s in summaries {
        // Values over fewer seeds than the row ran say over how many.
        let pm = |v: Option<Spread>, scale: f64, digits: usize, unit: &str| {
            v.map_or_else(
                || "—".to_string(),
                |v| {
                    let over = if v.n < s.seeds {
                        format!(" (n={})", v.n)
                    } else {
                        String::new()
                    };
                    format!(
                        "{:.digits$}{unit} ± {:.digits$}{over}",
                        v.mean * scale,
                        v.std * scale
                    )
                },
            )
        };
        out += &format!(
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} |\n",
            s.policy,
            s.reached,
            s.seeds,
            pm(Some(s.final_accuracy), 100.0, 2, "%"),
            pm(s.accuracy_vs_full_sync, 100.0, 2, ""),
            pm(s.seconds_to_target, 1.0, 2, ""),
            pm(s.wan_bytes_to_target, 1.0, 0, ""),
            pm(s.wan_bytes_vs_full_sync, 1.0, 1, "×"),
            pm(s.speedup_vs_full_sync, 1.0, 2, "×"),
        );
    }
    if summaries.iter().any(|s| s.final_perplexity.is_some()) {
        out += "\nValidation perplexity (per token, highest region), its ratio to full-sync's \
                of the same seed, and full-sync's WAN bytes over the whole run (the same number \
                of rounds) over this one's:\n\n\
                | policy | final perplexity | perplexity: this / full-sync | whole-run WAN \
                bytes: full-sync / this |\n\
                | --- | ---: | ---: | ---: |\n";
        for s in summaries {
            let pm = |v: Option<Spread>, digits: usize, unit: &str| {
                v.map_or_else(
                    || "—".to_string(),
                    |v| format!("{:.digits$}{unit} ± {:.digits$}", v.mean, v.std),
                )
            };
            out += &format!(
                "| {} | {} | {} | {} |\n",
                s.policy,
                pm(s.final_perplexity, 4, ""),
                pm(s.perplexity_vs_full_sync, 4, ""),
                pm(s.whole_run_wan_bytes_vs_full_sync, 1, "×")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, acc: f64, secs: Option<f64>, bytes: Option<u64>) -> SeedRow {
        SeedRow {
            policy: policy.into(),
            baseline: Some("full-sync".into()),
            final_accuracy: acc,
            seconds_to_target: secs,
            wan_bytes_to_target: bytes,
            final_loss: None,
            wan_bytes: None,
        }
    }

    #[test]
    fn perplexity_is_compared_with_full_sync_seed_by_seed() {
        let lm = |policy: &str, loss: f64, bytes: u64| SeedRow {
            final_loss: Some(loss),
            wan_bytes: Some(bytes),
            ..row(policy, 0.5, None, None)
        };
        let per_seed = vec![
            vec![
                lm("full-sync", 1.0, 1000),
                lm("weightgrad", 1.0 + 1.02f64.ln(), 10),
            ],
            vec![lm("full-sync", 2.0, 3000), lm("weightgrad", 2.0, 60)],
        ];
        let s = summarize(&per_seed);
        let ratio = s[1].perplexity_vs_full_sync.unwrap();
        assert!((ratio.mean - 1.01).abs() < 1e-12, "{ratio:?}");
        let perplexity = s[1].final_perplexity.unwrap();
        assert!((perplexity.mean - (1.02 * 1f64.exp() + 2f64.exp()) / 2.0).abs() < 1e-9);
        assert_eq!(s[1].whole_run_wan_bytes_vs_full_sync.unwrap().mean, 75.0);
        let table = markdown(&s, &[0, 1], "virtual s");
        assert!(
            table.contains("| weightgrad | ") && table.contains("1.0100 ± "),
            "{table}"
        );
        // Classifiers' rows carry no loss: no perplexity table.
        let plain = summarize(&[vec![row("full-sync", 0.9, None, None)]]);
        assert!(plain[0].final_perplexity.is_none());
        assert!(!markdown(&plain, &[0], "s").contains("perplexity"));
    }

    #[test]
    fn the_spread_is_the_sample_standard_deviation() {
        let s = Spread::of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!(s.mean, 5.0);
        assert!((s.std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12, "{s:?}");
        assert_eq!((s.min, s.max, s.n), (2.0, 9.0, 8));
        assert_eq!(Spread::of(&[3.0]).unwrap().std, 0.0);
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn ratios_are_taken_seed_by_seed_and_only_where_both_reached() {
        let seeds = vec![
            vec![
                row("full-sync", 0.96, Some(100.0), Some(1000)),
                row("weightgrad", 0.97, Some(20.0), Some(10)),
            ],
            vec![
                row("full-sync", 0.95, Some(50.0), Some(2000)),
                row("weightgrad", 0.94, Some(25.0), Some(40)),
            ],
            vec![
                row("full-sync", 0.90, None, None),
                row("weightgrad", 0.96, Some(30.0), Some(30)),
            ],
        ];
        let s = summarize(&seeds);
        let wg = &s[1];
        assert_eq!((wg.seeds, wg.reached), (3, 3));
        // 5x and 2x, not the ratio of means (150 / 45).
        let speed = wg.speedup_vs_full_sync.unwrap();
        assert_eq!((speed.mean, speed.n), (3.5, 2));
        let bytes = wg.wan_bytes_vs_full_sync.unwrap();
        assert_eq!((bytes.mean, bytes.n), (75.0, 2));
        // Accuracy differences use every seed: +1, −1, +6 points.
        let diff = wg.accuracy_vs_full_sync.unwrap();
        assert!((diff.mean - 0.02).abs() < 1e-12, "{diff:?}");
        assert_eq!(wg.seconds_to_target.unwrap().n, 3);
        let fs = &s[0];
        assert_eq!(fs.reached, 2);
        assert_eq!(fs.speedup_vs_full_sync.unwrap().mean, 1.0);
        let md = markdown(&s, &[0, 1, 2], "virtual s");
        assert!(
            md.contains("| weightgrad | 3/3 | 95.67% ± 1.53 | 2.00 ± 3.61 |"),
            "{md}"
        );
        assert!(md.contains("3.50× ± 2.12 (n=2)"), "{md}");
    }

    fn check(policy: &str, accuracy: f64, seconds: Option<f64>) -> RealCheck {
        RealCheck {
            real_wan_bytes: 100,
            sim_wan_bytes: 100,
            real_seconds: 10.0,
            sim_seconds: 10.0,
            sim_seconds_draws: vec![9.0, 11.0],
            sim_wan_bytes_draws: vec![90, 110],
            real_seconds_to_target: seconds,
            real_wan_bytes_to_target: seconds.map(|s| s as u64 * 10),
            sim_seconds_to_target: seconds,
            sim_draws_reaching_target: if seconds.is_some() { 2 } else { 0 },
            busy_seconds_per_round: 0.1,
            receive_seconds_per_round: 0.01,
            real_accuracy: accuracy,
            sim_accuracy: accuracy,
            real_rounds_behind_mean: 1.0,
            sim_rounds_behind_mean: 1.0,
            real_busiest_link_busy_share: 0.5,
            sim_busiest_link_busy_share: 0.5,
            ..RealCheck::placeholder(policy)
        }
    }

    #[test]
    fn real_rows_compare_with_the_real_full_sync_run_on_the_agents_clock() {
        let peer = PeerRun {
            name: "torch-ddp".into(),
            result: crate::bench::peer::PeerResult {
                wan_bytes: 5000,
                seconds: 40.0,
                final_accuracy: 0.94,
                curve: Vec::new(),
                notes: String::new(),
            },
            seconds_to_target: Some(30.0),
            wan_bytes_to_target: Some(3000),
        };
        let with = rows_of_real(
            &[
                check("full-sync", 0.95, Some(60.0)),
                check("weightgrad", 0.96, Some(12.0)),
            ],
            &[peer],
        );
        assert_eq!(with[1].baseline.as_deref(), Some("full-sync"));
        assert_eq!(with[1].seconds_to_target, Some(12.0));
        assert_eq!(with[1].wan_bytes_to_target, Some(120));
        assert_eq!(with[2].policy, "torch-ddp");
        assert_eq!(with[2].baseline.as_deref(), Some("full-sync"));
        let s = summarize(&[with]);
        assert_eq!(s[1].speedup_vs_full_sync.unwrap().mean, 5.0);
        assert_eq!(s[2].speedup_vs_full_sync.unwrap().mean, 2.0);
        let without = rows_of_real(&[check("weightgrad", 0.96, None)], &[]);
        assert_eq!(without[0].baseline, None);
    }

    #[test]
    fn rows_without_a_baseline_have_no_ratios() {
        let mut lonely = row("lan-only", 0.99, Some(1.0), Some(0));
        lonely.baseline = None;
        let s = summarize(&[vec![lonely]]);
        assert_eq!(s[0].accuracy_vs_full_sync, None);
        assert_eq!(s[0].speedup_vs_full_sync, None);
        assert!(markdown(&s, &[0], "s").contains("| lan-only | 1/1 | 99.00% ± 0.00 | — |"));
    }
}
