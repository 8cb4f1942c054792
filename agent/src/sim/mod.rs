//! In-process regions over a virtual-time WAN: the same training, sync core, codec and
//! policies as the agent, with time simulated so bytes and times are exact and repeatable.

pub mod region;
pub mod topology;
pub mod wan;

use crate::lan::{LanPlacement, RegionTrainer};
use crate::sync::{RegionSync, SyncConfig};
use crate::train::dataset::{RegionLayout, ShardStrategy};
use crate::train::{DataSplit, ModelSpec, schedule::LrSchedule};
use crate::wan::framing::group_for_streams;
use crate::wan::link::STREAM_TARGET_BYTES;
use anyhow::{Result, bail};
use region::{LinkMessages, RunShape, SimRegion};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use topology::Topology;
use wan::VirtualLink;
use weightgrad_sdk::{LinkStats, Policy};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Regions and the links between them.
    pub topology: Topology,
    /// Workers per region.
    pub workers: usize,
    /// Passes over each region's data.
    pub epochs: usize,
    /// Samples per worker per step.
    pub batch_size: usize,
    /// Seed for data order, initialisation (shared by all regions) and rounding; with
    /// [`Self::link_draw`], for the links' jitter and loss.
    pub seed: u64,
    /// Base learning rate (Adam; cosine schedule over the run).
    pub lr: f64,
    /// Virtual seconds one training step takes (deterministic compute cost).
    pub compute_s: f64,
    /// Virtual seconds one evaluation holds its region between two steps (0: evaluations
    /// take no time).
    pub evaluate_s: f64,
    /// A round's messages leave beside the next step, as an agent's overlapped WAN work
    /// sends them: after an evaluation's hold, not before it (the WAN work itself takes no
    /// virtual time either way). Mean merges never overlap, as in the agent.
    pub overlap: bool,
    /// The model.
    pub model: ModelSpec,
    /// How samples are dealt to regions and workers.
    pub sharding: ShardStrategy,
    /// WAN-level settings.
    pub sync: SyncConfig,
    /// Where each region's workers sit (decides whether data mode is allowed).
    pub lan_placement: LanPlacement,
    /// A link whose bandwidth falls mid-run.
    pub link_drop: Option<LinkDrop>,
    /// Rounds between evaluations (`None`: one epoch's rounds); the last round is always
    /// evaluated.
    pub evaluate_every: Option<u64>,
    /// Which draw of the links' jitter and loss the run takes (0 for the seed's own;
    /// data, model and training seed unchanged): a WAN-bound run's time depends on where
    /// its losses fall, so a prediction of it averages several draws.
    pub link_draw: u64,
}

/// A link that loses bandwidth mid-run (both directions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkDrop {
    /// One end (region index).
    pub a: usize,
    /// The other end.
    pub b: usize,
    /// The drop happens when the first region has finished this fraction of the run.
    pub at_fraction: f64,
    /// Bandwidth multiplier from then on (e.g. 0.1).
    pub factor: f64,
}

impl SimConfig {
    /// How the data is dealt to regions and workers.
    pub fn layout(&self) -> RegionLayout {
        RegionLayout {
            regions: self.topology.regions.len(),
            workers: self.workers,
            batch_size: self.batch_size,
            strategy: self.sharding,
            seed: self.seed,
        }
    }

    /// The demo's defaults: digits MLP, `regions` regions of 2 workers.
    pub fn demo(regions: usize, seed: u64) -> Self {
        Self {
            topology: Topology::default_for(regions),
            workers: 2,
            epochs: 30,
            batch_size: 16,
            seed,
            lr: 1e-3,
            compute_s: 0.005,
            evaluate_s: 0.0,
            overlap: false,
            model: ModelSpec::default_mlp(),
            sharding: ShardStrategy::Iid,
            sync: SyncConfig::default(),
            lan_placement: LanPlacement::default(),
            link_drop: None,
            evaluate_every: None,
            link_draw: 0,
        }
    }

    /// Rounds between evaluations: [`Self::evaluate_every`], or an epoch's rounds.
    pub fn evaluation_interval(&self, steps_per_epoch: u64) -> u64 {
        crate::train::evaluation_interval(self.evaluate_every, steps_per_epoch)
    }
}

/// Accuracy of every region after a given number of rounds.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    /// Rounds completed by every region.
    pub round: u64,
    /// Virtual time when the last region completed that round.
    pub virtual_seconds: f64,
    /// WAN bytes all regions had sent by then.
    pub wan_bytes: u64,
    /// LAN bytes all regions had moved by then.
    pub lan_bytes: u64,
    /// Lowest test top-1 over regions.
    pub min_accuracy: f64,
}

/// A region's final state.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    /// Region name.
    pub name: String,
    /// Final test top-1.
    pub test_accuracy: f64,
    /// Final test loss.
    pub test_loss: f64,
}

/// The outcome of one simulated run.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// Policy name.
    pub policy: String,
    /// Per-region results after every update has arrived.
    pub regions: Vec<RegionReport>,
    /// All WAN bytes sent.
    pub wan_bytes: u64,
    /// All LAN bytes moved.
    pub lan_bytes: u64,
    /// Virtual time until the last message arrived.
    pub virtual_seconds: f64,
    /// Rounds per region.
    pub rounds: u64,
    /// Accuracy after each epoch's worth of rounds, then at the end of the run (every
    /// message delivered).
    pub curve: Vec<EvalPoint>,
    /// Messages refused by receivers (should be 0).
    pub rejected: u64,
    /// Mean over every region's steps and links of the rounds the peer's delivered
    /// rounds were behind the region's finished ones when the step started: the
    /// staleness the run actually trained at.
    pub rounds_behind_mean: f64,
    /// The most rounds any peer was behind at a step's start.
    pub rounds_behind_max: u64,
    /// The largest share of the run any link was busy (a stream sent and not yet
    /// acknowledged), as the agents count their links' busy time: near 1 where a link
    /// sets the pace, lower where the links wait on each other or on compute.
    pub busiest_link_busy_share: f64,
}

impl SimReport {
    /// The lowest region's final test top-1.
    pub fn lowest_accuracy(&self) -> f64 {
        self.regions
            .iter()
            .map(|r| r.test_accuracy)
            .fold(1.0, f64::min)
    }

    /// The first evaluation at which every region reached `accuracy`.
    pub fn first_reaching(&self, accuracy: f64) -> Option<&EvalPoint> {
        first_reaching(&self.curve, accuracy)
    }
}

/// The first point of `curve` at which every region had reached `accuracy`: the rule by
/// which the simulator, the real agents and the bench's peers are all timed to a target.
pub fn first_reaching(curve: &[EvalPoint], accuracy: f64) -> Option<&EvalPoint> {
    curve.iter().find(|p| p.min_accuracy >= accuracy)
}

enum Event {
    StepDone(usize),
    /// The evaluation holding `region` is over; `sends` are the messages of its round that
    /// leave now (with overlap, beside the next step).
    Resume {
        region: usize,
        sends: Vec<LinkMessages>,
    },
    /// Link `link` of region `from` changes by itself (a stream through or starting);
    /// stale when the link changed since (`version`).
    LinkChange {
        from: usize,
        link: usize,
        version: u64,
    },
    Arrival {
        to: usize,
        from: usize,
        bytes: Vec<u8>,
    },
}

/// Every region's outgoing links, with the streams on them not yet through.
struct Wan {
    /// `links[a][l]`: region `a`'s link `l`.
    links: Vec<Vec<VirtualLink>>,
    /// Bumped whenever a link is touched: a scheduled [`Event::LinkChange`] with an older
    /// one is stale.
    versions: Vec<Vec<u64>>,
    /// The messages of each stream in flight, by (region, link, stream id).
    in_flight: HashMap<(usize, usize, u64), Vec<Vec<u8>>>,
}

impl Wan {
    /// Sends one round's messages from region `from` at `now`, on each link in turn.
    fn send_round(&mut self, now: f64, from: usize, round: Vec<LinkMessages>) -> Vec<(f64, Event)> {
        round
            .into_iter()
            .flat_map(|(link, messages)| self.send_on_link(now, from, link, messages))
            .collect()
    }

    /// Sends messages on region `from`'s link `link` at `now`, in streams grouped as the
    /// agent's link groups them; returns the events that causes.
    fn send_on_link(
        &mut self,
        now: f64,
        from: usize,
        link: usize,
        messages: Vec<Vec<u8>>,
    ) -> Vec<(f64, Event)> {
        let sizes: Vec<usize> = messages.iter().map(Vec::len).collect();
        let mut messages: Vec<Option<Vec<u8>>> = messages.into_iter().map(Some).collect();
        let mut arrived = Vec::new();
        for group in group_for_streams(&sizes, STREAM_TARGET_BYTES) {
            let stream: Vec<Vec<u8>> = group
                .iter()
                .map(|&i| messages[i].take().expect("each message is in one group"))
                .collect();
            let bytes: u64 = stream.iter().map(|m| m.len() as u64).sum();
            let (id, done) = self.links[from][link].send(now, bytes);
            arrived.extend(done);
            self.in_flight.insert((from, link, id), stream);
        }
        self.events_after(from, link, arrived)
    }

    /// Region `r`'s links as its policy sees them at `now`.
    fn link_stats(&self, r: usize, names: &[String], now: f64) -> Vec<LinkStats> {
        self.links[r]
            .iter()
            .enumerate()
            .map(|(l, link)| LinkStats {
                peer: names[peer_index(r, l)].clone(),
                bandwidth_bps: link.model().bandwidth_bps,
                rtt_s: link.model().rtt_s,
                loss: link.model().loss,
                queued_bytes: link.queued(now),
            })
            .collect()
    }

    /// The events `deliveries` on region `from`'s link `link` cause (each stream's
    /// messages arrive in order at the stream's arrival), and the link's next change.
    fn events_after(
        &mut self,
        from: usize,
        link: usize,
        deliveries: Vec<wan::Delivery>,
    ) -> Vec<(f64, Event)> {
        let to = peer_index(from, link);
        let mut out = Vec::new();
        for d in deliveries {
            let messages = self
                .in_flight
                .remove(&(from, link, d.stream))
                .expect("a delivered stream was sent");
            out.extend(
                messages
                    .into_iter()
                    .map(|bytes| (d.at, Event::Arrival { to, from, bytes })),
            );
        }
        self.versions[from][link] += 1;
        if let Some(at) = self.links[from][link].next_change() {
            out.push((
                at,
                Event::LinkChange {
                    from,
                    link,
                    version: self.versions[from][link],
                },
            ));
        }
        out
    }
}

fn link_index(me: usize, peer: usize) -> usize {
    if peer < me { peer } else { peer - 1 }
}

fn peer_index(me: usize, link: usize) -> usize {
    if link < me { link } else { link + 1 }
}

/// Runs `policy` on `data` under `cfg`; `progress(done, total)` sees rounds as they finish.
pub fn run(
    cfg: &SimConfig,
    policy: &dyn Policy,
    data: &DataSplit,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SimReport> {
    let names = cfg.topology.regions.clone();
    let n = names.len();
    if n < 2 {
        bail!("a simulation needs at least 2 regions, got {n}");
    }
    if cfg.workers == 0 || cfg.batch_size == 0 {
        bail!("workers and batch size must be positive");
    }
    if let Some(d) = cfg.link_drop
        && (d.a >= n || d.b >= n || d.a == d.b || !(d.factor > 0.0 && d.factor.is_finite()))
    {
        bail!("link drop {d:?} does not fit {n} regions");
    }
    let layout = cfg.layout();
    let mut regions = Vec::with_capacity(n);
    for (r, name) in names.iter().enumerate() {
        let shards = layout
            .worker_shards(&data.train.labels, r)
            .iter()
            .map(|idx| data.train.subset(idx))
            .collect();
        let mut trainer = RegionTrainer::new(
            name,
            &cfg.model,
            shards,
            data.train.classes,
            cfg.batch_size,
            cfg.seed,
            cfg.seed.wrapping_add(r as u64 * 7919),
        )?;
        trainer.set_placement(cfg.lan_placement);
        let peers: Vec<String> = names.iter().filter(|p| *p != name).cloned().collect();
        let mut sync = RegionSync::new(
            name,
            &peers,
            trainer.metas().to_vec(),
            cfg.sync.clone(),
            cfg.seed ^ (r as u64 + 1) << 32,
        );
        sync.start(&trainer.weights);
        regions.push(SimRegion::new(trainer, sync));
    }
    let steps_per_epoch = layout.steps_per_epoch(&data.train.labels);
    let total_rounds = steps_per_epoch * cfg.epochs as u64;
    let evaluate_every = cfg.evaluation_interval(steps_per_epoch);
    let overlap = cfg.overlap && cfg.sync.merge == crate::sync::MergeMode::Sum;
    let shape = RunShape {
        total_rounds,
        base_lr: cfg.lr,
        schedule: LrSchedule::Cosine { min_factor: 0.0 },
        regions: n as u32,
        evaluation_s: cfg.evaluate_s,
    };
    let links: Vec<Vec<VirtualLink>> = (0..n)
        .map(|a| {
            (0..n)
                .filter(|&b| b != a)
                .map(|b| {
                    VirtualLink::new(
                        cfg.topology.link(a, b),
                        cfg.seed ^ ((a * n + b) as u64) << 16 ^ cfg.link_draw << 40,
                    )
                })
                .collect()
        })
        .collect();
    let mut wan = Wan {
        versions: vec![vec![0; n - 1]; n],
        links,
        in_flight: HashMap::new(),
    };

    // First LAN plan: ask the policy once with empty residuals.
    for (r, rt) in regions.iter_mut().enumerate() {
        rt.first_decision(policy, &shape, &wan.link_stats(r, &names, 0.0))?;
    }

    let mut queue: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    let mut events: HashMap<u64, Event> = HashMap::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BinaryHeap<Reverse<(u64, u64)>>,
                    events: &mut HashMap<u64, Event>,
                    t: f64,
                    e: Event| {
        seq += 1;
        queue.push(Reverse(((t * 1e9).round() as u64, seq)));
        events.insert(seq, e);
    };
    let mut now = 0.0f64;
    let mut done_rounds = 0u64;
    let mut dropped = false;
    let mut rejected = 0u64;
    for (r, rt) in regions.iter_mut().enumerate() {
        if rt.try_start(&shape)? {
            push(
                &mut queue,
                &mut events,
                now + cfg.compute_s,
                Event::StepDone(r),
            );
        }
    }
    while let Some(Reverse((t_ns, id))) = queue.pop() {
        now = t_ns as f64 / 1e9;
        let event = events.remove(&id).expect("every queued id has an event");
        // The region the event may let start its next step.
        let may_start = match event {
            Event::StepDone(r) => {
                let round = regions[r].sync.round() + 1;
                if let Some(d) = cfg
                    .link_drop
                    .filter(|d| !dropped && round as f64 >= d.at_fraction * total_rounds as f64)
                {
                    dropped = true;
                    for (x, y) in [(d.a, d.b), (d.b, d.a)] {
                        let l = link_index(x, y);
                        let link = &mut wan.links[x][l];
                        let arrived =
                            link.set_bandwidth(now, link.model().bandwidth_bps * d.factor);
                        for (t, e) in wan.events_after(x, l, arrived) {
                            push(&mut queue, &mut events, t, e);
                        }
                    }
                }
                let stats = wan.link_stats(r, &names, now);
                let rt = &mut regions[r];
                let (finished, outgoing) = rt.finish_step(policy, &shape, &stats)?;
                debug_assert_eq!(finished, round);
                let held = rt.evaluate_if_due(round, evaluate_every, &shape, &data.test, now)?;
                done_rounds += 1;
                progress(done_rounds, total_rounds * n as u64);
                // With overlap the round's messages leave beside the next step: after
                // an evaluation that holds the region.
                let (now_sent, sent_on_resume) = match held {
                    Some(_) if overlap => (Vec::new(), outgoing),
                    _ => (outgoing, Vec::new()),
                };
                for (t, e) in wan.send_round(now, r, now_sent) {
                    push(&mut queue, &mut events, t, e);
                }
                match held {
                    Some(ends) => {
                        let sends = sent_on_resume;
                        push(
                            &mut queue,
                            &mut events,
                            ends,
                            Event::Resume { region: r, sends },
                        );
                        None
                    }
                    None => Some(r),
                }
            }
            Event::Resume { region, sends } => {
                for (t, e) in wan.send_round(now, region, sends) {
                    push(&mut queue, &mut events, t, e);
                }
                regions[region].resume();
                Some(region)
            }
            Event::LinkChange {
                from,
                link,
                version,
            } => {
                if version == wan.versions[from][link] {
                    let arrived = wan.links[from][link].advance(now);
                    for (t, e) in wan.events_after(from, link, arrived) {
                        push(&mut queue, &mut events, t, e);
                    }
                }
                None
            }
            Event::Arrival { to, from, bytes } => {
                let rt = &mut regions[to];
                if rt.receive(link_index(to, from), &bytes).is_err() {
                    rejected += 1;
                }
                Some(to)
            }
        };
        if let Some(r) = may_start
            && regions[r].try_start(&shape)?
        {
            push(
                &mut queue,
                &mut events,
                now + cfg.compute_s,
                Event::StepDone(r),
            );
        }
    }
    if let Some(stuck) = regions.iter().find(|r| r.sync.round() < total_rounds) {
        bail!(
            "simulation stalled: {} finished {} of {total_rounds} rounds",
            stuck.sync.name(),
            stuck.sync.round()
        );
    }
    let points = regions.iter().map(|r| r.evals().len()).min().unwrap_or(0);
    let reports = regions
        .iter()
        .map(|r| {
            let e = r.trainer.evaluate(&data.test)?;
            Ok(RegionReport {
                name: r.sync.name().to_string(),
                test_accuracy: e.accuracy,
                test_loss: e.loss,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let wan_bytes = regions.iter().map(SimRegion::wan_sent).sum();
    let lan_bytes = regions.iter().map(|r| r.trainer.lan_bytes()).sum();
    let link_counters: Vec<_> = regions
        .iter()
        .flat_map(|r| (0..r.sync.link_count()).map(|l| r.sync.counters(l)))
        .collect();
    let steps: u64 = link_counters.iter().map(|c| c.steps_started).sum();
    let rounds_behind_mean = link_counters
        .iter()
        .map(|c| c.rounds_behind_sum)
        .sum::<u64>() as f64
        / steps.max(1) as f64;
    let rounds_behind_max = link_counters
        .iter()
        .map(|c| c.rounds_behind_max)
        .max()
        .unwrap_or(0);
    let mut curve: Vec<EvalPoint> = (0..points)
        .map(|k| EvalPoint {
            round: ((k as u64 + 1) * evaluate_every).min(total_rounds),
            virtual_seconds: regions.iter().map(|r| r.evals()[k].at).fold(0.0, f64::max),
            wan_bytes: regions.iter().map(|r| r.evals()[k].wan_sent).sum(),
            lan_bytes: regions.iter().map(|r| r.evals()[k].lan_bytes).sum(),
            min_accuracy: regions
                .iter()
                .map(|r| r.evals()[k].accuracy)
                .fold(1.0, f64::min),
        })
        .collect();
    // The end of the run: every message delivered (and, for the mean merge, applied) and
    // the last evaluation over.
    curve.push(EvalPoint {
        round: total_rounds,
        virtual_seconds: now,
        wan_bytes,
        lan_bytes,
        min_accuracy: reports.iter().map(|r| r.test_accuracy).fold(1.0, f64::min),
    });
    Ok(SimReport {
        policy: policy.info().name,
        regions: reports,
        wan_bytes,
        lan_bytes,
        virtual_seconds: now,
        rounds: total_rounds,
        curve,
        rejected,
        rounds_behind_mean,
        rounds_behind_max,
        busiest_link_busy_share: wan
            .links
            .iter()
            .flatten()
            .map(|l| (l.busy_seconds() / now.max(f64::MIN_POSITIVE)).min(1.0))
            .fold(0.0, f64::max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::builtin;
    use crate::train::dataset::embedded_digits;

    fn small(seed: u64) -> SimConfig {
        SimConfig {
            epochs: 2,
            ..SimConfig::demo(2, seed)
        }
    }

    #[test]
    fn evaluations_follow_the_interval_and_the_last_round_is_always_one() {
        let data = embedded_digits().unwrap();
        let cfg = SimConfig {
            evaluate_every: Some(7),
            ..small(1)
        };
        let report = run(
            &cfg,
            builtin("topk").unwrap().as_ref(),
            &data,
            &mut |_, _| {},
        )
        .unwrap();
        let total = report.rounds;
        assert_ne!(
            total % 7,
            0,
            "the run's length should not be a multiple of 7"
        );
        let mut want: Vec<u64> = (1..).map(|k| k * 7).take_while(|&r| r < total).collect();
        // The last round's evaluation, then the end of the run once everything arrived.
        want.extend([total, total]);
        let rounds: Vec<u64> = report.curve.iter().map(|p| p.round).collect();
        assert_eq!(rounds, want);
    }

    #[test]
    fn an_evaluation_holds_its_region_between_two_steps() {
        let data = embedded_digits().unwrap();
        // Steps long beside the links' round trip: compute sets the pace.
        let cfg = SimConfig {
            epochs: 1,
            compute_s: 0.05,
            evaluate_every: Some(7),
            ..small(3)
        };
        let hold = 0.4;
        let policy = builtin("topk").unwrap();
        let plain = run(&cfg, policy.as_ref(), &data, &mut |_, _| {}).unwrap();
        let held = run(
            &SimConfig {
                evaluate_s: hold,
                ..cfg.clone()
            },
            policy.as_ref(),
            &data,
            &mut |_, _| {},
        )
        .unwrap();
        assert!(plain.curve.len() >= 4, "{:?}", plain.curve);
        // Each evaluation is recorded when it ends, after every hold before it.
        for (k, (p, h)) in plain.curve.iter().zip(&held.curve).take(3).enumerate() {
            assert_eq!(p.round, h.round);
            let later = h.virtual_seconds - p.virtual_seconds;
            let want = (k + 1) as f64 * hold;
            assert!(
                (later - want).abs() < cfg.compute_s,
                "evaluation {k}: {later} s later, {want} expected"
            );
        }
        let evaluations = plain.curve.len() as f64 - 1.0;
        assert!(held.virtual_seconds - plain.virtual_seconds >= (evaluations - 1.0) * hold);
    }

    #[test]
    fn with_overlap_a_rounds_messages_leave_after_its_evaluation() {
        let data = embedded_digits().unwrap();
        // Lockstep: every step waits for the peer's previous round.
        let mut cfg = SimConfig {
            epochs: 1,
            compute_s: 0.05,
            evaluate_s: 0.4,
            evaluate_every: Some(7),
            ..small(3)
        };
        cfg.sync.max_staleness = 0;
        let policy = builtin("topk").unwrap();
        let before = run(&cfg, policy.as_ref(), &data, &mut |_, _| {}).unwrap();
        let after = run(
            &SimConfig {
                overlap: true,
                ..cfg.clone()
            },
            policy.as_ref(),
            &data,
            &mut |_, _| {},
        )
        .unwrap();
        // Sent before the evaluation, a round crosses the 80 ms link during it; sent after,
        // the next step waits for it: at least half a round trip more per evaluation
        // before the last.
        let evaluations = before.curve.len() as f64 - 2.0;
        assert!(evaluations >= 3.0, "{:?}", before.curve);
        let later = after.virtual_seconds - before.virtual_seconds;
        assert!(later >= evaluations * 0.04, "{later} s later");
        assert_eq!(after.wan_bytes, before.wan_bytes, "the same rounds sent");
    }

    #[test]
    fn runs_are_exactly_repeatable_from_the_seed() {
        let data = embedded_digits().unwrap();
        let policy = builtin("weightgrad").unwrap();
        let a = run(&small(4), policy.as_ref(), &data, &mut |_, _| {}).unwrap();
        let b = run(&small(4), policy.as_ref(), &data, &mut |_, _| {}).unwrap();
        assert_eq!(a.wan_bytes, b.wan_bytes);
        assert_eq!(a.lan_bytes, b.lan_bytes);
        assert_eq!(a.virtual_seconds, b.virtual_seconds);
        assert_eq!(a.regions[0].test_loss, b.regions[0].test_loss);
        assert_eq!(a.rejected, 0);
        assert_eq!(a.curve.len(), 3, "two epochs and the end of the run");
    }

    #[test]
    fn a_link_draw_moves_where_losses_fall_and_repeats_exactly() {
        let data = embedded_digits().unwrap();
        let mut cfg = small(4);
        cfg.epochs = 1;
        for link in cfg.topology.links.iter_mut().flatten() {
            link.bandwidth_bps = 2e6;
            link.loss = 0.01;
        }
        let seconds = |draw| {
            let c = SimConfig {
                link_draw: draw,
                ..cfg.clone()
            };
            run(
                &c,
                builtin("full-sync").unwrap().as_ref(),
                &data,
                &mut |_, _| {},
            )
            .unwrap()
            .virtual_seconds
        };
        let first = seconds(0);
        assert_eq!(first, seconds(0), "a draw is repeatable");
        assert_ne!(first, seconds(1), "another draw loses other packets");
    }

    #[test]
    fn weightgrad_sends_far_less_than_full_sync_and_both_learn() {
        let data = embedded_digits().unwrap();
        let full = run(
            &small(1),
            builtin("full-sync").unwrap().as_ref(),
            &data,
            &mut |_, _| {},
        )
        .unwrap();
        let wg = run(
            &small(1),
            builtin("weightgrad").unwrap().as_ref(),
            &data,
            &mut |_, _| {},
        )
        .unwrap();
        assert!(
            wg.wan_bytes * 5 < full.wan_bytes,
            "{} vs {}",
            wg.wan_bytes,
            full.wan_bytes
        );
        assert!(wg.lan_bytes < full.lan_bytes);
        for r in full.regions.iter().chain(&wg.regions) {
            assert!(r.test_accuracy > 0.8, "{}: {}", r.name, r.test_accuracy);
        }
    }

    #[test]
    fn staleness_zero_keeps_regions_in_lockstep_and_finishes() {
        let data = embedded_digits().unwrap();
        let mut cfg = small(2);
        cfg.sync.max_staleness = 0;
        cfg.epochs = 1;
        let r = run(
            &cfg,
            builtin("gaia").unwrap().as_ref(),
            &data,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(r.rejected, 0);
        assert!(
            r.virtual_seconds > r.rounds as f64 * 0.080 / 2.0,
            "each round waits for the peer"
        );
    }
}
