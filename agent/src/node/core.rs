//! The agent's core loop: trains rounds, asks the policy, hands each link its messages,
//! applies what peers send, tracks peer liveness, and serves or adopts snapshots. It owns
//! every piece of training and sync state and runs on its own thread; the WAN tasks talk to
//! it through [`WanEvent`]s.

use super::checkpoint::AgentCheckpoint;
use super::evaluator::{Evaluator, Finished, Snapshot};
use super::liveness::{Liveness, LivenessChange};
use super::status::{ByteTotals, PeerStatus, PolicyStatus, Status, now_rfc3339};
use crate::lan::RegionTrainer;
use crate::policy::PolicyRuntime;
use crate::sync::{Merge, ReceiveError, RegionSync, decode_snapshot, encode_snapshot};
use crate::telemetry as m;
use crate::train::Dataset;
use crate::train::schedule::LrSchedule;
use crate::wan::inbound::Acceptor;
use crate::wan::link::{LinkSender, WanEvent};
use anyhow::{Result, anyhow};
use serde::Serialize;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use weightgrad_sdk::{LanPlan, LinkPlan, LinkStats, PolicyInput, RoundContext, TensorPlan};

/// Largest snapshot accepted (decompressed).
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// Per-link figures in the final report.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    /// Peer region.
    pub peer: String,
    /// WAN bytes sent to it (as encoded).
    pub bytes_sent: u64,
    /// WAN bytes received from it.
    pub bytes_received: u64,
    /// Messages refused.
    pub rejected: u64,
    /// Updates received twice (after a reconnect) and applied once.
    pub duplicates: u64,
    /// Its rounds fully arrived.
    pub peer_rounds_complete: u64,
    /// Connections made to it.
    pub connects: u64,
    /// Connections replaced by a fresh dial right after their handshake, because a packet
    /// lost during it had ended their slow start at the initial window (not in `connects`).
    pub fresh_redials: u64,
    /// Measured goodput to it while busy, bit/s.
    pub goodput_bps: f64,
    /// Seconds during which a stream to it was sent and not yet acknowledged.
    pub busy_seconds: f64,
    /// Per-link conservation gap relative to the largest Σ local update (float rounding:
    /// about 1e-6); absent when the model is too large to audit.
    pub conservation_error: Option<f64>,
    /// Mean rounds the peer's delivered rounds were behind this region's finished ones
    /// when its steps started: the staleness the run actually trained at.
    pub rounds_behind_mean: f64,
    /// The most rounds the peer was behind at a step's start.
    pub rounds_behind_max: u64,
}

/// What an agent did, written at the end of its run.
#[derive(Debug, Clone, Serialize)]
pub struct AgentReport {
    /// Region name.
    pub region: String,
    /// Policy name.
    pub policy: String,
    /// Rounds finished.
    pub rounds: u64,
    /// Final test top-1.
    pub test_accuracy: f64,
    /// Final test loss.
    pub test_loss: f64,
    /// WAN bytes this region sent (updates, markers, notices, snapshots).
    pub wan_bytes: u64,
    /// LAN bytes this region moved.
    pub lan_bytes: u64,
    /// Snapshots this region adopted.
    pub snapshots_adopted: u64,
    /// Snapshots this region served.
    pub snapshots_served: u64,
    /// Seconds from start to the end of the run.
    pub wall_seconds: f64,
    /// Seconds from the start of the first round to the moment every peer's last round
    /// had arrived (none when stopped early).
    pub training_seconds: Option<f64>,
    /// When the first round started, seconds since the Unix epoch (none before it): with
    /// [`Evaluation::unix_seconds`], puts several agents' runs on one clock.
    pub training_started_unix: Option<f64>,
    /// The test-set evaluations of the run (every epoch and the last round), in order.
    pub evaluations: Vec<Evaluation>,
    /// Mean wall time of this region's own work per round, seconds: steps, policy calls,
    /// encoding, decoding and merging peers' updates, evaluations, with what runs beside
    /// a step counted once (the critical path). What the simulator's per-step compute
    /// cost stands for.
    pub busy_seconds_per_round: f64,
    /// Wall time spent decoding and merging peers' updates, per round of its own, seconds
    /// (beside a step with overlap, between rounds otherwise): work the simulator's merges
    /// do in no time.
    pub receive_seconds_per_round: f64,
    /// Where a round's time went, mean seconds per round.
    pub round_costs: RoundCosts,
    /// Whether a round's WAN work ran beside the next step.
    pub overlap: bool,
    /// Rounds whose WAN work ran beside the next round's step.
    pub overlapped_rounds: u64,
    /// Whether the run was stopped before its last round.
    pub interrupted: bool,
    /// Connections refused at the TLS handshake (wrong CA, unknown or mismatched name).
    pub tls_refusals: u64,
    /// Connections refused at the application handshake (version, identity, model).
    pub handshake_refusals: u64,
    /// Malformed streams dropped.
    pub bad_streams: u64,
    /// Per link.
    pub links: Vec<LinkReport>,
}

/// One test-set evaluation during a run.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Evaluation {
    /// The round just trained.
    pub round: u64,
    /// When it was measured, seconds since the Unix epoch.
    pub unix_seconds: f64,
    /// Test top-1.
    pub test_accuracy: f64,
    /// WAN bytes this region had sent by then.
    pub wan_bytes: u64,
    /// Each peer's rounds fully arrived by then, in link order.
    #[serde(default)]
    pub peer_rounds_complete: Vec<u64>,
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Where a round's time went, mean seconds per round of this region. With overlap the
/// parts add up to more than a round: encoding and decoding run beside the step.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RoundCosts {
    /// Training steps (the region's workers and its aggregator).
    pub step: f64,
    /// Policy decisions, with the statistics they read.
    pub policy: f64,
    /// Filtering, quantizing, encoding and compressing what the round sends.
    pub encode: f64,
    /// Decoding and merging peers' updates.
    pub receive: f64,
    /// Test-set evaluations (every epoch).
    pub evaluate: f64,
    /// Waiting with nothing to do: for peers under the staleness bound, or for a step.
    pub wait: f64,
}

/// Seconds spent on each part of the rounds, summed.
#[derive(Debug, Clone, Copy, Default)]
struct CostTotals {
    step: Duration,
    policy: Duration,
    encode: Duration,
    receive: Duration,
    evaluate: Duration,
    wait: Duration,
}

impl CostTotals {
    fn per_round(&self, rounds: u64) -> RoundCosts {
        let per = |d: Duration| d.as_secs_f64() / rounds.max(1) as f64;
        RoundCosts {
            step: per(self.step),
            policy: per(self.policy),
            encode: per(self.encode),
            receive: per(self.receive),
            evaluate: per(self.evaluate),
            wait: per(self.wait),
        }
    }
}

/// A finished round's WAN work, still to do: the weights its significance filter reads
/// (as they were when the round's step ended) and the policy's plans.
struct EncodeJob {
    round: u64,
    weights: Vec<Vec<f32>>,
    plans: Vec<LinkPlan>,
}

/// Where the core loop is when it asks for the next event (a scripted source in tests
/// delivers by it; the WAN tasks' channel ignores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Between rounds, with this many rounds' steps done.
    Between {
        /// Rounds whose step is done.
        trained: u64,
    },
    /// While the step of this round runs.
    Step {
        /// The round being trained.
        round: u64,
    },
    /// After the last round, letting what was sent be acknowledged.
    Closing,
}

/// The WAN tasks are gone: no event will come again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceClosed;

/// Where the core loop's events come from: the WAN tasks (a channel), or a script.
pub trait EventSource {
    /// The next event, waiting up to `wait` (not at all for zero); `None` when none came.
    fn next_event(
        &mut self,
        phase: Phase,
        wait: Duration,
    ) -> Result<Option<WanEvent>, SourceClosed>;
}

impl EventSource for Receiver<WanEvent> {
    fn next_event(&mut self, _: Phase, wait: Duration) -> Result<Option<WanEvent>, SourceClosed> {
        let got = if wait.is_zero() {
            self.try_recv().map_err(|e| match e {
                std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                std::sync::mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            self.recv_timeout(wait)
        };
        match got {
            Ok(ev) => Ok(Some(ev)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(SourceClosed),
        }
    }
}

/// Everything the core loop owns.
pub struct Core {
    /// Region name.
    pub region: String,
    /// The region's trainer.
    pub trainer: RegionTrainer,
    /// The region's WAN state.
    pub sync: RegionSync,
    /// The policy.
    pub policy: Arc<PolicyRuntime>,
    /// Model manifest hash.
    pub manifest: String,
    /// Test set (shared with the evaluation thread).
    pub test: Arc<Dataset>,
    /// Outgoing links, by link index.
    pub links: Vec<LinkSender>,
    /// Configured link bandwidth (bit/s) and RTT (s), the policy's prior.
    pub configured: (f64, f64),
    /// Rounds in the run.
    pub total_rounds: u64,
    /// Rounds per epoch.
    pub steps_per_epoch: u64,
    /// Rounds between evaluations on the test set (and the last round).
    pub evaluate_every: u64,
    /// Base learning rate.
    pub lr: f64,
    /// Regions in the run.
    pub regions: u32,
    /// Peer deadline.
    pub deadline: Duration,
    /// Published finished rounds (for handshakes).
    pub round: Arc<AtomicU64>,
    /// Set to stop after the current round.
    pub stop: Arc<AtomicBool>,
    /// Refusal and bad-input counters kept by the WAN tasks.
    pub wan_counters: WanCounters,
    /// Where the status page reads from.
    pub status: Arc<RwLock<Status>>,
    /// The accepting side (closed before the final checkpoint).
    pub acceptor: Arc<Acceptor>,
    /// Where checkpoints go.
    pub checkpoint_path: PathBuf,
    /// Rounds between periodic checkpoints (besides the ones at the end and on stop).
    pub checkpoint_every: u64,
    /// A checkpoint to resume from.
    pub resume: Option<AgentCheckpoint>,
    /// Run a round's WAN work (encoding what it sends, decoding what arrives) beside the
    /// next step where the staleness bound allows, instead of after it.
    pub overlap: bool,
    /// Evaluate on the test set beside training ([`Evaluator`]) instead of between rounds.
    pub evaluate_in_background: bool,
}

/// Counters the WAN tasks keep for the report.
#[derive(Debug, Clone, Default)]
pub struct WanCounters {
    /// Failed TLS handshakes.
    pub tls_refusals: Arc<AtomicU64>,
    /// Refused hellos.
    pub handshake_refusals: Arc<AtomicU64>,
    /// Malformed streams.
    pub bad_streams: Arc<AtomicU64>,
}

struct LoopState {
    /// How long the last training step took (zero before the first).
    last_step: Duration,
    liveness: Liveness,
    lan_plan: LanPlan,
    policy_state: Vec<u8>,
    wan_sent: u64,
    peer_rounds: Vec<Option<u64>>,
    fetching: Option<usize>,
    fetch_retry_at: Option<Duration>,
    adopted: u64,
    served: u64,
    wan_received: u64,
    loss: Option<f32>,
    accuracy: Option<f64>,
    policy_digest: String,
    policy_loaded_at: String,
    last_round_start: Option<Instant>,
    state: &'static str,
    first_round_start: Option<Instant>,
    /// The same moment on the system clock, seconds since the Unix epoch.
    first_round_start_unix: Option<f64>,
    /// The run's evaluations so far.
    evaluations: Vec<Evaluation>,
    /// Evaluations beside training, when the core runs them there.
    evaluator: Option<Evaluator<Evaluation>>,
    busy: Duration,
    busy_rounds: u64,
    /// Time in decoding and merging peers' updates.
    receiving: Duration,
    /// Where the rounds' time went.
    costs: CostTotals,
    /// Time waited since the last round started.
    waited: Duration,
    /// Rounds whose WAN work ran beside the next step.
    overlapped_rounds: u64,
    /// The last round's WAN work, when it runs beside the next step.
    pending_encode: Option<EncodeJob>,
    /// Peers' updates decoded while a step used the weights, to add in before the next.
    pending_merges: Vec<Merge>,
    /// Events that arrived while a step ran and need the weights or the sending state;
    /// handled in order once it is over.
    deferred: VecDeque<WanEvent>,
    /// Resumed from a periodic (not clean) checkpoint: take any peer's model that is ahead.
    catch_up: bool,
    /// Started without state and not trained yet: take a peer's model if the run is well
    /// under way. A region that has its own state (it was partitioned, or restarted from a
    /// clean checkpoint) keeps it and merges through the residuals instead.
    fresh: bool,
}

impl Core {
    fn link_stats(&self) -> Vec<LinkStats> {
        self.links
            .iter()
            .enumerate()
            .map(|(l, link)| {
                let shared = link.shared();
                let transport = shared.transport();
                let (bw, rtt) = self.configured;
                let (rtt_s, loss, estimate) = match &transport {
                    Some(t) if !t.smoothed_rtt.is_zero() => (
                        t.smoothed_rtt.as_secs_f64(),
                        t.loss_rate(),
                        f64::from(t.congestion_window) * 8.0 / t.smoothed_rtt.as_secs_f64(),
                    ),
                    _ => (rtt, 0.0, bw),
                };
                LinkStats {
                    peer: self.sync.peer(l).to_string(),
                    bandwidth_bps: estimate.min(bw),
                    rtt_s,
                    loss,
                    queued_bytes: shared.unacked_bytes.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    fn handle(&mut self, st: &mut LoopState, event: WanEvent, now: Duration) -> Result<()> {
        // Frames, markers and connection changes touch only the receiving side; a resume
        // notice or a snapshot sees the state with every round's WAN work done.
        let needs_sending_state = match &event {
            WanEvent::Message { bytes, .. } => {
                bytes.starts_with(&crate::sync::message::RESUMED_MAGIC)
            }
            WanEvent::SnapshotRequest { .. } | WanEvent::Snapshot { .. } => true,
            _ => false,
        };
        if needs_sending_state {
            self.flush_encode(st)?;
        }
        match event {
            WanEvent::Message { link, bytes } => {
                st.wan_received += bytes.len() as u64;
                let peer = self.sync.peer(link).to_string();
                metrics::counter!(m::WAN_BYTES_RECEIVED, "peer" => peer.clone())
                    .increment(bytes.len() as u64);
                let began = Instant::now();
                let received = self.sync.receive(link, &bytes, &mut self.trainer.weights);
                st.receiving += began.elapsed();
                st.costs.receive += began.elapsed();
                st.busy += began.elapsed();
                metrics::histogram!(m::RECEIVE_SECONDS).record(began.elapsed().as_secs_f64());
                count_received(&self.sync, link, peer, received);
            }
            WanEvent::Connected { link, round } => {
                st.peer_rounds[link] = Some(round);
                if let Some(LivenessChange::Included(l)) = st.liveness.connected(link) {
                    self.sync.clock_mut().set_live(l, true);
                    tracing::info!(
                        peer = self.sync.peer(l),
                        "peer is back: it counts towards the mirror clock again"
                    );
                }
                self.maybe_fetch(st, now);
            }
            WanEvent::Disconnected { link } => st.liveness.disconnected(link, now),
            WanEvent::PeerHello { link, hello } => {
                tracing::debug!(
                    peer = self.sync.peer(link),
                    round = hello.round,
                    "peer hello"
                );
            }
            WanEvent::SnapshotRequest { link, reply } => {
                let snap = self
                    .sync
                    .snapshot_for(link, &self.trainer.weights, &self.manifest);
                let bytes = encode_snapshot(&snap);
                st.wan_sent += bytes.len() as u64;
                st.served += 1;
                metrics::counter!(m::WAN_BYTES_SENT, "peer" => self.sync.peer(link).to_string())
                    .increment(bytes.len() as u64);
                metrics::counter!(m::SNAPSHOTS, "kind" => "served").increment(1);
                tracing::info!(
                    peer = self.sync.peer(link),
                    round = snap.round,
                    bytes = bytes.len(),
                    "serving a snapshot"
                );
                let _ = reply.send(bytes);
            }
            WanEvent::Snapshot { link, bytes } => {
                st.fetching = None;
                let outcome = bytes
                    .and_then(|b| decode_snapshot(&b, MAX_SNAPSHOT_BYTES))
                    .and_then(|snap| {
                        if snap.manifest != self.manifest {
                            return Err(format!(
                                "snapshot of another model (manifest {})",
                                snap.manifest
                            ));
                        }
                        let notice = self.sync.adopt(&snap, &mut self.trainer.weights)?;
                        if st.catch_up {
                            // Resumed after a crash: peers already hold what the lost
                            // rounds sent from the old residuals.
                            self.sync.clear_residuals();
                        }
                        Ok((snap.round, notice))
                    });
                match outcome {
                    Ok((round, notice)) => {
                        st.adopted += 1;
                        st.catch_up = false;
                        st.fresh = false;
                        metrics::counter!(m::SNAPSHOTS, "kind" => "adopted").increment(1);
                        self.round.store(self.sync.round(), Ordering::Relaxed);
                        tracing::info!(
                            peer = self.sync.peer(link),
                            round,
                            "adopted the peer's model; resuming from its round"
                        );
                        let bytes = notice.to_bytes();
                        for (l, link) in self.links.iter().enumerate() {
                            st.wan_sent += bytes.len() as u64;
                            metrics::counter!(m::WAN_BYTES_SENT, "peer" => self.sync.peer(l).to_string())
                                .increment(bytes.len() as u64);
                            link.send(bytes.clone());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(
                            peer = self.sync.peer(link),
                            "could not take the peer's snapshot: {e}"
                        );
                        st.fetch_retry_at = Some(now + Duration::from_secs(1));
                    }
                }
            }
        }
        Ok(())
    }

    /// A region without state (fresh, or restarted after a crash) takes the model of a
    /// reachable peer that is ahead, instead of training on from a stale one. A region with
    /// its own state (after a partition heals) keeps it: the residuals carry every update
    /// across, and the mirror clock lets the one ahead wait.
    fn maybe_fetch(&mut self, st: &mut LoopState, now: Duration) {
        if !(st.fresh || st.catch_up)
            || st.fetching.is_some()
            || st.fetch_retry_at.is_some_and(|t| now < t)
        {
            return;
        }
        let round = self.sync.round();
        if st.catch_up
            && (0..self.links.len())
                .all(|l| st.peer_rounds[l].is_some_and(|r| r <= self.sync.clock().complete(l)))
        {
            // No peer has finished a round beyond what the checkpoint holds of it: nothing
            // was handed over after the checkpoint.
            st.catch_up = false;
        }
        let behind = if st.catch_up {
            round
        } else {
            round + self.sync.clock().max_staleness() + 1
        };
        let ahead = (0..self.links.len())
            .filter(|&l| st.liveness.is_connected(l))
            .filter_map(|l| st.peer_rounds[l].map(|r| (r, l)))
            .filter(|&(r, _)| r > behind)
            .max();
        if let Some((round, l)) = ahead {
            tracing::info!(
                peer = self.sync.peer(l),
                peer_round = round,
                round = self.sync.round(),
                "far behind a peer: fetching its model"
            );
            // The peer's round is stale once we have its model.
            st.peer_rounds[l] = None;
            st.fetch_retry_at = None;
            if self.links[l].request_snapshot() {
                st.fetching = Some(l);
            }
        }
    }

    /// The round the next step trains: after the finished rounds and the one whose WAN
    /// work is pending.
    fn next_round(&self, st: &LoopState) -> u64 {
        st.pending_encode
            .as_ref()
            .map_or(self.sync.round(), |job| job.round)
            + 1
    }

    /// Whether the next step may start: its round is in the run and under the staleness
    /// bound (counting a round whose WAN work is pending as finished, where it can run
    /// beside the step).
    fn may_step(&self, st: &LoopState) -> bool {
        if st.pending_encode.is_some() {
            self.next_round(st) <= self.total_rounds && self.sync.may_start_beyond_next()
        } else {
            self.sync.round() < self.total_rounds && self.sync.may_start_next()
        }
    }

    /// One round: the step (beside the previous round's WAN work, if pending, and the
    /// decoding of what peers send meanwhile), then the policy's decision, then this
    /// round's WAN work, now or (with overlap) beside the next step.
    ///
    /// The order of everything that touches the model or the WAN state is the sequential
    /// one: the WAN work of round t reads the weights as the step left them (a copy, when
    /// it runs later), peers' updates decoded during a step are added in before the next
    /// one, and events that need the weights or the sending state wait for the step. So
    /// for the same delivery of peers' messages to round boundaries the bytes and the
    /// model are the same with or without overlap.
    fn train_round(
        &mut self,
        st: &mut LoopState,
        schedule: &LrSchedule,
        events: &mut impl EventSource,
    ) -> Result<()> {
        let round_start = Instant::now();
        if let Some(prev) = st.last_round_start.replace(round_start) {
            metrics::histogram!(m::ROUND_SECONDS).record(prev.elapsed().as_secs_f64());
        }
        metrics::histogram!(m::WAIT_SECONDS).record(st.waited.as_secs_f64());
        st.waited = Duration::ZERO;
        let round = self.next_round(st);
        self.sync.note_step_start(round);
        let lr = schedule.lr_at(self.lr, round - 1, self.total_rounds);
        let plan = st.lan_plan.clone();
        let pending = st.pending_encode.take();
        let step_start = Instant::now();
        let step = {
            // Disjoint parts of the core: the step owns the trainer; this thread the WAN
            // state, the links and the events.
            let trainer = &mut self.trainer;
            let (sync, links, published) = (&mut self.sync, &self.links, &*self.round);
            let overlap = self.overlap;
            std::thread::scope(|scope| -> Result<_> {
                let handle = std::thread::Builder::new()
                    .name("weightgrad-step".into())
                    .spawn_scoped(scope, move || trainer.step(&plan, lr))?;
                if overlap {
                    if let Some(job) = pending {
                        encode_and_send(sync, links, published, st, &job.weights, &job)?;
                        st.overlapped_rounds += 1;
                    }
                    // Sleep on the channel until the step is nearly due (80% of the last
                    // one), then look for its end every millisecond: waking every
                    // millisecond throughout takes the step's cores from it.
                    let due = step_start + st.last_step.mul_f64(0.8);
                    decode_during_step(sync, st, events, round, due, || handle.is_finished());
                }
                handle
                    .join()
                    .map_err(|_| anyhow!("the training step panicked"))?
            })?
        };
        let step_time = step_start.elapsed();
        st.last_step = step_time;
        metrics::histogram!(m::STEP_SECONDS).record(step_time.as_secs_f64());
        st.costs.step += step_time;
        st.loss = Some(step.loss);
        self.sync.add_local_update(&step.delta);
        let context = RoundContext {
            round,
            lr: lr as f32,
            base_lr: self.lr as f32,
            loss: step.loss,
            regions: self.regions,
            final_round: round == self.total_rounds,
        };
        let decided = Instant::now();
        let input = PolicyInput {
            context,
            thresholds: self.sync.stat_thresholds().to_vec(),
            links: self
                .sync
                .policy_links(&self.trainer.weights, &self.link_stats()),
            lan: self.trainer.lan_input(),
            state: st.policy_state.clone(),
        };
        let call = Instant::now();
        let decision = self.policy.decide_round(&input);
        metrics::histogram!(m::POLICY_CALL_SECONDS).record(call.elapsed().as_secs_f64());
        if let Some(f) = &decision.failure {
            metrics::counter!(m::POLICY_FAILURES, "kind" => f.kind()).increment(1);
        }
        if decision.rolled_back.is_some() {
            metrics::counter!(m::POLICY_ROLLBACKS, "cause" => "breaker").increment(1);
            metrics::counter!(m::POLICY_SWAPS).increment(1);
        }
        let mut plans = decision.output.links;
        // Excluded peers get nothing: their updates wait in the residual.
        for (l, plan) in plans.iter_mut().enumerate() {
            if !st.liveness.is_live(l) {
                plan.tensors.iter_mut().for_each(|t| *t = TensorPlan::HOLD);
            }
        }
        st.lan_plan = decision.output.lan;
        st.policy_state = decision.output.state;
        st.costs.policy += decided.elapsed();
        let job = EncodeJob {
            round,
            // The weights as this step left them: later merges must not move the filter.
            weights: if self.overlap {
                self.trainer.weights.clone()
            } else {
                Vec::new()
            },
            plans,
        };
        if self.overlap {
            st.pending_encode = Some(job);
        } else {
            encode_and_send(
                &mut self.sync,
                &self.links,
                &self.round,
                st,
                &self.trainer.weights,
                &job,
            )?;
        }
        metrics::gauge!(m::LOSS).set(f64::from(step.loss));
        metrics::counter!(m::LAN_BYTES).absolute(self.trainer.lan_bytes());
        if round.is_multiple_of(self.evaluate_every) || round == self.total_rounds {
            let record = Evaluation {
                round,
                unix_seconds: unix_now(),
                test_accuracy: f64::NAN,
                wan_bytes: st.wan_sent,
                peer_rounds_complete: (0..self.sync.link_count())
                    .map(|l| self.sync.clock().complete(l))
                    .collect(),
            };
            let finished = match st.evaluator.as_mut() {
                Some(evaluator) => {
                    let snapshot = Snapshot {
                        weights: self.trainer.weights.clone(),
                        meta: record,
                    };
                    // Only a full queue holds the round up.
                    let (finished, waited) = evaluator.submit(snapshot)?;
                    st.costs.evaluate += waited;
                    finished
                }
                None => {
                    let began = Instant::now();
                    let result = self.trainer.evaluate(&self.test)?;
                    st.costs.evaluate += began.elapsed();
                    vec![Finished {
                        meta: record,
                        result,
                    }]
                }
            };
            self.record_evaluations(st, finished);
        } else if let Some(evaluator) = st.evaluator.as_mut() {
            let finished = evaluator.poll()?;
            self.record_evaluations(st, finished);
        }
        // What peers sent during the step, in the order it arrived.
        let began = Instant::now();
        for merge in st.pending_merges.drain(..) {
            merge.apply(&mut self.trainer.weights);
        }
        st.receiving += began.elapsed();
        st.costs.receive += began.elapsed();
        Ok(())
    }

    /// Records finished evaluations (in round order): the report's list, the status page's
    /// accuracy, the metric and the log.
    fn record_evaluations(&self, st: &mut LoopState, finished: Vec<Finished<Evaluation>>) {
        for Finished { mut meta, result } in finished {
            meta.test_accuracy = result.accuracy;
            st.accuracy = Some(result.accuracy);
            metrics::gauge!(m::ACCURACY).set(result.accuracy);
            tracing::info!(
                round = meta.round,
                epoch = meta.round / self.steps_per_epoch,
                test_loss = result.loss,
                test_accuracy = result.accuracy,
                wan_bytes = meta.wan_bytes,
                "round"
            );
            st.evaluations.push(meta);
        }
    }

    /// Does a pending round's WAN work now (before a checkpoint, when no step can run
    /// beside it, or at the end).
    fn flush_encode(&mut self, st: &mut LoopState) -> Result<()> {
        match st.pending_encode.take() {
            Some(job) => encode_and_send(
                &mut self.sync,
                &self.links,
                &self.round,
                st,
                &job.weights,
                &job,
            ),
            None => Ok(()),
        }
    }

    /// Notices a policy swap before the next decision: the new policy's state blob starts
    /// empty (another policy's state means nothing to it).
    fn publish_policy_change(&self, st: &mut LoopState) {
        let active = self.policy.active();
        if active.digest != st.policy_digest {
            if !st.policy_digest.is_empty() {
                tracing::info!(policy = %active.info.name, digest = %active.digest, round = self.sync.round(), "policy changed; its state starts empty");
                st.policy_state.clear();
            }
            st.policy_digest = active.digest.clone();
            st.policy_loaded_at = now_rfc3339();
        }
    }

    /// Publishes the status page and the link gauges.
    fn publish(&self, st: &mut LoopState) {
        self.publish_policy_change(st);
        let active = self.policy.active();
        let round = self.sync.round();
        // Also while starting or waiting, so a region stuck before its first round shows
        // (not before a checkpoint is taken up: the gauge would dip to 0 on a restart).
        if self.resume.is_none() {
            metrics::gauge!(m::ROUND).set(round as f64);
        }
        let peers = (0..self.links.len())
            .map(|l| {
                let peer = self.sync.peer(l).to_string();
                let shared = self.links[l].shared();
                let transport = shared.transport();
                let connected = st.liveness.is_connected(l);
                let complete = self.sync.clock().complete(l);
                let queued = shared.unacked_bytes.load(Ordering::Relaxed);
                metrics::gauge!(m::PEER_UP, "peer" => peer.clone()).set(if connected {
                    1.0
                } else {
                    0.0
                });
                metrics::gauge!(m::STALENESS, "peer" => peer.clone())
                    .set(round as f64 - complete as f64);
                metrics::gauge!(m::LINK_QUEUED, "peer" => peer.clone()).set(queued as f64);
                metrics::gauge!(m::LINK_GOODPUT, "peer" => peer.clone()).set(shared.goodput_bps());
                if let Some(t) = &transport {
                    metrics::gauge!(m::LINK_RTT, "peer" => peer.clone())
                        .set(t.smoothed_rtt.as_secs_f64());
                    metrics::gauge!(m::LINK_CWND, "peer" => peer.clone())
                        .set(f64::from(t.congestion_window));
                    metrics::gauge!(m::LINK_IN_FLIGHT, "peer" => peer.clone())
                        .set(f64::from(t.bytes_in_flight));
                    metrics::counter!(m::LINK_LOST, "peer" => peer.clone())
                        .absolute(t.packets_lost);
                }
                PeerStatus {
                    name: peer,
                    state: if connected {
                        "up"
                    } else if st.liveness.is_live(l) {
                        "down"
                    } else {
                        "excluded"
                    },
                    rtt_ms: transport.map(|t| t.smoothed_rtt.as_secs_f64() * 1e3),
                    goodput_bps: shared.goodput_bps(),
                    staleness: round as i64 - complete as i64,
                    rounds_complete: complete,
                    queued_bytes: queued,
                }
            })
            .collect();
        metrics::gauge!(m::POLICY_QUARANTINED).set(self.policy.breaker().quarantined.len() as f64);
        metrics::counter!(m::REFUSALS, "kind" => "tls")
            .absolute(self.wan_counters.tls_refusals.load(Ordering::Relaxed));
        metrics::counter!(m::REFUSALS, "kind" => "handshake")
            .absolute(self.wan_counters.handshake_refusals.load(Ordering::Relaxed));
        let status = Status {
            region: self.region.clone(),
            state: st.state,
            round,
            total_rounds: self.total_rounds,
            loss: st.loss,
            test_accuracy: st.accuracy,
            peers,
            policy: PolicyStatus {
                name: active.info.name.clone(),
                version: active.info.version.clone(),
                digest: active.digest.clone(),
                loaded_at: st.policy_loaded_at.clone(),
                breaker: self.policy.breaker(),
            },
            policy_failures: self
                .policy
                .failures()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            bytes: ByteTotals {
                wan_sent: st.wan_sent,
                wan_received: st.wan_received,
                lan: self.trainer.lan_bytes(),
            },
        };
        *self.status.write().expect("status") = status;
    }

    /// Writes a checkpoint; a failure is logged and training goes on (the previous
    /// checkpoint stays in place).
    fn save_checkpoint(&self, st: &LoopState, clean: bool) -> bool {
        let started = Instant::now();
        let ck = self.trainer.export_state().map(|trainer| AgentCheckpoint {
            format: AgentCheckpoint::current_format(),
            region: self.region.clone(),
            manifest: self.manifest.clone(),
            total_rounds: self.total_rounds,
            policy_digest: st.policy_digest.clone(),
            policy_state: st.policy_state.clone(),
            wan_sent: st.wan_sent,
            trainer,
            sync: self.sync.export_state(),
            unacked: self
                .links
                .iter()
                .map(|l| {
                    l.shared()
                        .unacknowledged()
                        .into_iter()
                        .map(serde_bytes::ByteBuf::from)
                        .collect()
                })
                .collect(),
            clean,
        });
        match ck.and_then(|ck| ck.save(&self.checkpoint_path)) {
            Ok(()) => {
                tracing::info!(round = self.sync.round(), path = %self.checkpoint_path.display(), ms = started.elapsed().as_millis() as u64, "checkpoint written");
                true
            }
            Err(e) => {
                tracing::error!("checkpoint failed, the previous one stays: {e:#}");
                false
            }
        }
    }

    /// Restores a checkpoint taken by this region's run.
    fn resume_from(&mut self, st: &mut LoopState, ck: AgentCheckpoint) -> Result<()> {
        let round = ck.sync.round();
        self.trainer.restore_state(ck.trainer)?;
        self.sync
            .restore_state(ck.sync)
            .map_err(|e| anyhow!("{}: {e}", self.checkpoint_path.display()))?;
        st.wan_sent = ck.wan_sent;
        // After a crash, what peers handed over since this checkpoint is gone and they will
        // not send it again: catch up from any peer that is ahead.
        st.catch_up = !ck.clean;
        if ck.policy_digest == self.policy.active().digest {
            st.policy_state = ck.policy_state;
        } else {
            tracing::info!("the checkpoint was taken under another policy; its state starts empty");
        }
        // What peers had not acknowledged goes first, in order.
        for (link, messages) in self.links.iter().zip(ck.unacked) {
            for m in messages {
                link.send(m.into_vec());
            }
        }
        self.round.store(round, Ordering::Relaxed);
        tracing::info!(round, path = %self.checkpoint_path.display(), clean = ck.clean, "resuming from checkpoint");
        // From here on the run moves past the checkpoint: should this process crash, the
        // file must not still claim a clean stop.
        if ck.clean {
            self.save_checkpoint(st, false);
        }
        Ok(())
    }

    /// Before the final checkpoint: lets what was sent be acknowledged (up to `patience`),
    /// then stops taking messages and applies everything already handed over.
    fn quiesce(
        &mut self,
        st: &mut LoopState,
        events: &mut impl EventSource,
        patience: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < patience
            && self.links.iter().any(|l| {
                l.shared().connected.load(Ordering::Relaxed)
                    && l.shared().unacked_messages.load(Ordering::Relaxed) > 0
            })
        {
            if let Ok(Some(ev)) = events.next_event(Phase::Closing, Duration::from_millis(20)) {
                let now = start.elapsed();
                self.handle(st, ev, now)?;
            }
        }
        self.acceptor.close();
        let now = start.elapsed();
        while let Ok(Some(ev)) = events.next_event(Phase::Closing, Duration::ZERO) {
            self.handle(st, ev, now)?;
        }
        Ok(())
    }

    /// Every live peer's rounds have arrived and everything sent is acknowledged.
    fn finished(&self, st: &LoopState) -> bool {
        self.sync.round() >= self.total_rounds
            && (0..self.links.len()).all(|l| {
                !st.liveness.is_live(l)
                    || (self.sync.clock().complete(l) >= self.total_rounds
                        && self.links[l]
                            .shared()
                            .unacked_messages
                            .load(Ordering::Relaxed)
                            == 0)
            })
    }

    /// Runs the loop until the run is over or `stop` is set; `events` carries what the WAN
    /// tasks report.
    pub fn run(mut self, mut events: impl EventSource) -> Result<AgentReport> {
        let start = Instant::now();
        let schedule = LrSchedule::Cosine { min_factor: 0.0 };
        let n = self.links.len();
        let mut st = LoopState {
            last_step: Duration::ZERO,
            liveness: Liveness::new(n, self.deadline, Duration::ZERO),
            lan_plan: LanPlan::FULL_PRECISION,
            policy_state: Vec::new(),
            wan_sent: 0,
            peer_rounds: vec![None; n],
            fetching: None,
            fetch_retry_at: None,
            adopted: 0,
            served: 0,
            wan_received: 0,
            loss: None,
            accuracy: None,
            policy_digest: String::new(),
            policy_loaded_at: String::new(),
            last_round_start: None,
            state: "starting",
            first_round_start: None,
            first_round_start_unix: None,
            evaluations: Vec::new(),
            evaluator: if self.evaluate_in_background {
                // One compute thread: this agent shares its host; evaluate on what is left.
                let low_priority = crate::train::device::one_compute_thread();
                Some(Evaluator::start(
                    self.trainer.evaluation_model()?,
                    Arc::clone(&self.test),
                    low_priority,
                    Evaluator::<Evaluation>::DEFAULT_QUEUE_BYTES,
                )?)
            } else {
                None
            },
            busy: Duration::ZERO,
            busy_rounds: 0,
            receiving: Duration::ZERO,
            costs: CostTotals::default(),
            waited: Duration::ZERO,
            overlapped_rounds: 0,
            pending_encode: None,
            pending_merges: Vec::new(),
            deferred: VecDeque::new(),
            catch_up: false,
            fresh: self.resume.is_none(),
        };
        self.publish(&mut st);
        // The first LAN plan: the policy's answer before any update exists.
        let input = PolicyInput {
            context: RoundContext {
                round: 0,
                lr: self.lr as f32,
                base_lr: self.lr as f32,
                loss: f32::NAN,
                regions: self.regions,
                final_round: false,
            },
            thresholds: self.sync.stat_thresholds().to_vec(),
            links: self
                .sync
                .policy_links(&self.trainer.weights, &self.link_stats()),
            lan: self.trainer.lan_input(),
            state: Vec::new(),
        };
        let first = self.policy.decide_round(&input);
        st.lan_plan = first.output.lan;
        st.policy_state = first.output.state;
        if let Some(ck) = self.resume.take() {
            self.resume_from(&mut st, ck)?;
        }
        // Settings the alerts compare with, once.
        metrics::gauge!(m::STALENESS_BOUND).set(self.sync.clock().max_staleness() as f64);
        metrics::gauge!(m::RUN_ROUNDS).set(self.total_rounds as f64);
        // Every decision failure kind and rollback cause starts at 0, so the first is an
        // increase.
        for kind in crate::policy::PolicyFailure::DECISION_KINDS {
            metrics::counter!(m::POLICY_FAILURES, "kind" => kind).increment(0);
        }
        for cause in ["breaker", "operator"] {
            metrics::counter!(m::POLICY_ROLLBACKS, "cause" => cause).increment(0);
        }
        let mut interrupted = false;
        let mut training_seconds = None;
        let mut last_publish = Instant::now();
        loop {
            let now = start.elapsed();
            if last_publish.elapsed() >= Duration::from_millis(200) {
                self.publish(&mut st);
                last_publish = Instant::now();
            }
            // What waited for the last step, in order, then what arrived since.
            while let Some(ev) = st.deferred.pop_front() {
                self.handle(&mut st, ev, now)?;
            }
            let between = Phase::Between {
                trained: self.next_round(&st) - 1,
            };
            loop {
                match events.next_event(between, Duration::ZERO) {
                    Ok(Some(ev)) => self.handle(&mut st, ev, now)?,
                    Ok(None) => break,
                    Err(SourceClosed) => return Err(anyhow!("the WAN tasks stopped")),
                }
            }
            for change in st.liveness.tick(now) {
                if let LivenessChange::Excluded(l) = change {
                    self.sync.clock_mut().set_live(l, false);
                    tracing::warn!(
                        peer = self.sync.peer(l),
                        deadline_s = self.deadline.as_secs_f64(),
                        "peer unreachable past the deadline: the others go on; its updates wait in its residual"
                    );
                }
            }
            if st.fetch_retry_at.is_some_and(|t| now >= t) {
                self.maybe_fetch(&mut st, now);
            }
            if self.stop.load(Ordering::Relaxed) {
                self.flush_encode(&mut st)?;
                interrupted = self.sync.round() < self.total_rounds;
                break;
            }
            if self.finished(&st) {
                training_seconds = st.first_round_start.map(|t| t.elapsed().as_secs_f64());
                break;
            }
            self.sync.apply_outer_step(&mut self.trainer.weights);
            let may_train = st.liveness.settled() && st.fetching.is_none() && self.may_step(&st);
            if may_train {
                // A swap lands between rounds: look before asking the policy.
                self.publish_policy_change(&mut st);
                st.state = "training";
                let began = Instant::now();
                st.first_round_start.get_or_insert(began);
                st.first_round_start_unix.get_or_insert_with(unix_now);
                st.fresh = false;
                self.train_round(&mut st, &schedule, &mut events)?;
                let round = self.next_round(&st) - 1;
                if self.checkpoint_every > 0 && round.is_multiple_of(self.checkpoint_every) {
                    self.flush_encode(&mut st)?;
                    self.save_checkpoint(&st, false);
                }
                st.busy += began.elapsed();
                st.busy_rounds += 1;
                continue;
            }
            if st.pending_encode.is_some() {
                // No step can run beside it: peers may be waiting for this round.
                let began = Instant::now();
                self.flush_encode(&mut st)?;
                st.busy += began.elapsed();
                continue;
            }
            st.state = if !st.liveness.settled() {
                "starting"
            } else if st.fetching.is_some() {
                "fetching"
            } else if self.sync.round() >= self.total_rounds {
                "finished"
            } else {
                "waiting"
            };
            let waiting = Instant::now();
            let event = events.next_event(between, Duration::from_millis(50));
            if st.first_round_start.is_some() && st.state == "waiting" {
                st.costs.wait += waiting.elapsed();
                st.waited += waiting.elapsed();
            }
            match event {
                Ok(Some(ev)) => self.handle(&mut st, ev, start.elapsed())?,
                Ok(None) => {}
                Err(SourceClosed) => return Err(anyhow!("the WAN tasks stopped")),
            }
        }
        st.state = if interrupted { "stopping" } else { "finished" };
        self.publish(&mut st);
        // Flush what the plan sent, take in what peers handed over, then checkpoint.
        self.flush_encode(&mut st)?;
        self.quiesce(&mut st, &mut events, Duration::from_secs(10))?;
        self.save_checkpoint(&st, true);
        if let Some(evaluator) = st.evaluator.take() {
            let finished = evaluator.finish()?;
            self.record_evaluations(&mut st, finished);
        }
        let e = self.trainer.evaluate(&self.test)?;
        st.accuracy = Some(e.accuracy);
        self.publish(&mut st);
        let links = (0..n)
            .map(|l| {
                let c = self.sync.counters(l);
                let shared = self.links[l].shared();
                LinkReport {
                    peer: self.sync.peer(l).to_string(),
                    bytes_sent: c.bytes_sent,
                    bytes_received: c.bytes_received,
                    rejected: c.rejected,
                    duplicates: c.duplicates,
                    peer_rounds_complete: self.sync.clock().complete(l),
                    connects: shared.connects.load(Ordering::Relaxed),
                    fresh_redials: shared.fresh_redials.load(Ordering::Relaxed),
                    goodput_bps: shared.goodput_bps(),
                    busy_seconds: shared.busy_micros.load(Ordering::Relaxed) as f64 / 1e6,
                    conservation_error: self.sync.conservation_error(l),
                    rounds_behind_mean: c.rounds_behind_mean(),
                    rounds_behind_max: c.rounds_behind_max,
                }
            })
            .collect();
        Ok(AgentReport {
            region: self.region.clone(),
            policy: self.policy.active().info.name.clone(),
            rounds: self.sync.round(),
            test_accuracy: e.accuracy,
            test_loss: e.loss,
            wan_bytes: st.wan_sent,
            lan_bytes: self.trainer.lan_bytes(),
            snapshots_adopted: st.adopted,
            snapshots_served: st.served,
            wall_seconds: start.elapsed().as_secs_f64(),
            training_seconds,
            training_started_unix: st.first_round_start_unix,
            evaluations: std::mem::take(&mut st.evaluations),
            busy_seconds_per_round: st.busy.as_secs_f64() / st.busy_rounds.max(1) as f64,
            receive_seconds_per_round: st.receiving.as_secs_f64() / st.busy_rounds.max(1) as f64,
            round_costs: st.costs.per_round(st.busy_rounds),
            overlap: self.overlap,
            overlapped_rounds: st.overlapped_rounds,
            interrupted,
            tls_refusals: self.wan_counters.tls_refusals.load(Ordering::Relaxed),
            handshake_refusals: self.wan_counters.handshake_refusals.load(Ordering::Relaxed),
            bad_streams: self.wan_counters.bad_streams.load(Ordering::Relaxed),
            links,
        })
    }
}

/// While the step of `round` runs (until `done`, then what is already queued): decodes
/// peers' frames and markers into the clock and `pending_merges`, and defers everything
/// else (snapshots, resume notices, connection changes), and whatever comes after it, to
/// run in order once the step is over.
fn decode_during_step(
    sync: &mut RegionSync,
    st: &mut LoopState,
    events: &mut impl EventSource,
    round: u64,
    due: Instant,
    done: impl Fn() -> bool,
) {
    let phase = Phase::Step { round };
    loop {
        // Once the step is over, what is already queued is taken without waiting.
        let finished = done();
        let wait = if finished {
            Duration::ZERO
        } else {
            due.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let ev = match events.next_event(phase, wait) {
            Ok(Some(ev)) => ev,
            Ok(None) if finished => break,
            Ok(None) => continue,
            Err(SourceClosed) => break,
        };
        let decodable = st.deferred.is_empty()
            && matches!(&ev, WanEvent::Message { bytes, .. }
                if !bytes.starts_with(&crate::sync::message::RESUMED_MAGIC));
        match ev {
            WanEvent::Message { link, bytes } if decodable => {
                st.wan_received += bytes.len() as u64;
                let peer = sync.peer(link).to_string();
                metrics::counter!(m::WAN_BYTES_RECEIVED, "peer" => peer.clone())
                    .increment(bytes.len() as u64);
                let began = Instant::now();
                let received = sync.receive_deferred(link, &bytes);
                st.receiving += began.elapsed();
                st.costs.receive += began.elapsed();
                metrics::histogram!(m::RECEIVE_SECONDS).record(began.elapsed().as_secs_f64());
                let outcome = received.map(|merge| st.pending_merges.extend(merge));
                count_received(sync, link, peer, outcome);
            }
            other => st.deferred.push_back(other),
        }
    }
}

/// Counts and logs the outcome of a peer's message.
fn count_received(sync: &RegionSync, link: usize, peer: String, outcome: Result<(), ReceiveError>) {
    match outcome {
        Ok(()) => {
            metrics::counter!(m::WAN_DECODED_BYTES_RECEIVED, "peer" => peer)
                .absolute(sync.counters(link).elements_received * 4);
        }
        Err(e @ ReceiveError::Duplicate { .. }) => tracing::debug!("{e}"),
        Err(e) => {
            metrics::counter!(m::MESSAGES_REJECTED, "peer" => peer).increment(1);
            tracing::warn!("refused a WAN message: {e}");
        }
    }
}

/// A round's WAN work: filter (against `weights`), quantize, encode and compress what each
/// link gets, hand it to the link, count it, and publish the finished round.
fn encode_and_send(
    sync: &mut RegionSync,
    links: &[LinkSender],
    published: &AtomicU64,
    st: &mut LoopState,
    weights: &[Vec<f32>],
    job: &EncodeJob,
) -> Result<()> {
    let began = Instant::now();
    let outgoing = sync.finish_round(weights, &job.plans)?;
    let numel: u64 = sync.numel() as u64;
    for o in outgoing {
        let peer = sync.peer(o.link).to_string();
        let mut sent_bytes = 0u64;
        for msg in o.messages {
            let bytes = msg.to_bytes();
            sent_bytes += bytes.len() as u64;
            links[o.link].send(bytes);
        }
        st.wan_sent += sent_bytes;
        let elements: u64 = o.frames.iter().map(|f| f.elements).sum();
        metrics::counter!(m::WAN_BYTES_SENT, "peer" => peer.clone()).increment(sent_bytes);
        metrics::counter!(m::WAN_DECODED_BYTES_SENT, "peer" => peer.clone())
            .increment(elements * 4);
        metrics::counter!(m::ELEMENTS_SENT, "peer" => peer.clone()).increment(elements);
        metrics::counter!(m::ELEMENTS_HELD, "peer" => peer.clone()).increment(o.elements_held);
        metrics::gauge!(m::SIGNIFICANCE_RATIO, "peer" => peer.clone())
            .set(elements as f64 / numel.max(1) as f64);
        for f in &o.frames {
            metrics::histogram!(m::BITS_CHOSEN, "peer" => peer.clone(), "kind" => f.role.name())
                .record(f64::from(f.bits));
            if f.compressed > 0 {
                metrics::histogram!(m::ZSTD_RATIO).record(f.packed as f64 / f.compressed as f64);
            }
        }
    }
    debug_assert_eq!(sync.round(), job.round);
    published.store(job.round, Ordering::Relaxed);
    metrics::gauge!(m::ROUND).set(job.round as f64);
    let spent = began.elapsed();
    st.costs.encode += spent;
    metrics::histogram!(m::ENCODE_SECONDS).record(spent.as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{FailStrategy, Sandbox, SandboxLimits, builtin_wasm};
    use crate::sync::SyncConfig;
    use crate::train::ModelSpec;
    use crate::train::dataset::{RegionLayout, ShardStrategy, embedded_digits};
    use crate::wan::handshake::Expectation;
    use std::collections::HashMap;

    const REGIONS: [&str; 2] = ["us-east", "eu-west"];
    const EPOCHS: u64 = 2;

    /// Events handed to the core by where it is, as a test scripts them.
    struct Script(HashMap<Phase, VecDeque<WanEvent>>);

    impl EventSource for Script {
        fn next_event(
            &mut self,
            phase: Phase,
            _: Duration,
        ) -> Result<Option<WanEvent>, SourceClosed> {
            Ok(self.0.get_mut(&phase).and_then(VecDeque::pop_front))
        }
    }

    fn layout() -> RegionLayout {
        RegionLayout {
            regions: 2,
            workers: 2,
            batch_size: 16,
            strategy: ShardStrategy::Iid,
            seed: 3,
        }
    }

    fn trainer(region: usize) -> RegionTrainer {
        let data = embedded_digits().unwrap();
        let shards = layout()
            .worker_shards(&data.train.labels, region)
            .iter()
            .map(|idx| data.train.subset(idx))
            .collect();
        RegionTrainer::new(
            REGIONS[region],
            &ModelSpec::default_mlp(),
            shards,
            data.train.classes,
            16,
            3,
            3 + region as u64,
        )
        .unwrap()
    }

    fn sync(region: usize, trainer: &RegionTrainer) -> RegionSync {
        let mut s = RegionSync::new(
            REGIONS[region],
            &[REGIONS[1 - region].to_string()],
            trainer.metas().to_vec(),
            SyncConfig::default(),
            11 + region as u64,
        );
        s.start(&trainer.weights);
        s
    }

    fn rounds() -> u64 {
        layout().steps_per_epoch(&embedded_digits().unwrap().train.labels) * EPOCHS
    }

    /// What the peer sends for each round 1..: it trains on its own and sends every
    /// tensor at 8 bits every round.
    fn peer_messages() -> Vec<Vec<Vec<u8>>> {
        let mut t = trainer(1);
        let mut s = sync(1, &t);
        let plan = LinkPlan {
            tensors: vec![
                TensorPlan {
                    send: true,
                    tau: 0.0,
                    bits: 8,
                    top_fraction: 1.0,
                };
                t.metas().len()
            ],
        };
        (1..=rounds())
            .map(|round| {
                let step = t.step(&LanPlan::FULL_PRECISION, 1e-3).unwrap();
                s.add_local_update(&step.delta);
                let out = s
                    .finish_round(&t.weights, std::slice::from_ref(&plan))
                    .unwrap();
                assert_eq!(s.round(), round);
                out.into_iter()
                    .flat_map(|o| o.messages)
                    .map(|m| m.to_bytes())
                    .collect()
            })
            .collect()
    }

    /// Runs region 0's core against the scripted peer; returns what it sent, its final
    /// checkpoint file and its report.
    fn run(overlap: bool, script: Script) -> (Vec<Vec<u8>>, Vec<u8>, AgentReport) {
        run_policy("weightgrad", overlap, script)
    }

    /// [`run`] with the shipped policy `policy`.
    fn run_policy(
        policy: &str,
        overlap: bool,
        script: Script,
    ) -> (Vec<Vec<u8>>, Vec<u8>, AgentReport) {
        let dir = tempfile::tempdir().unwrap();
        let trainer = trainer(0);
        let sync = sync(0, &trainer);
        // A generous deadline: a loaded machine must not turn a call into a fallback.
        let sandbox = Arc::new(
            Sandbox::new(SandboxLimits {
                deadline: Duration::from_secs(5),
                ..SandboxLimits::default()
            })
            .unwrap(),
        );
        let policy = Arc::new(
            PolicyRuntime::new(sandbox, builtin_wasm(policy).unwrap(), FailStrategy::Closed)
                .unwrap(),
        );
        let (link, sent) = LinkSender::recording();
        let (events, _) = std::sync::mpsc::channel();
        let manifest = trainer.manifest_hash();
        let round = Arc::new(AtomicU64::new(0));
        let core = Core {
            region: REGIONS[0].into(),
            test: Arc::new(embedded_digits().unwrap().test),
            trainer,
            sync,
            policy,
            manifest: manifest.clone(),
            links: vec![link],
            configured: (100e6, 0.08),
            total_rounds: rounds(),
            steps_per_epoch: rounds() / EPOCHS,
            evaluate_every: rounds() / EPOCHS,
            lr: 1e-3,
            regions: 2,
            deadline: Duration::from_secs(3600),
            round: round.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            wan_counters: WanCounters::default(),
            status: Arc::new(RwLock::new(Status::default())),
            acceptor: Arc::new(Acceptor {
                expect: Expectation {
                    region: REGIONS[0].into(),
                    peers: vec![REGIONS[1].into()],
                    manifest,
                },
                round,
                events,
                max_message: 1 << 20,
                refusals: Arc::new(AtomicU64::new(0)),
                bad_streams: Arc::new(AtomicU64::new(0)),
                open: RwLock::new(true),
            }),
            checkpoint_path: dir.path().join("us-east.ckpt"),
            checkpoint_every: 0,
            resume: None,
            overlap,
            // Both ways of evaluating, so the overlap test compares their records too.
            evaluate_in_background: overlap,
        };
        let checkpoint = core.checkpoint_path.clone();
        let report = core.run(script).unwrap();
        let sent = std::mem::take(&mut *sent.lock().unwrap());
        (sent, std::fs::read(checkpoint).unwrap(), report)
    }

    /// The peer connects at the start; its round `r` is delivered by `at(r)`.
    fn script(messages: &[Vec<Vec<u8>>], at: impl Fn(u64) -> Phase) -> Script {
        let mut phases: HashMap<Phase, VecDeque<WanEvent>> = HashMap::new();
        phases
            .entry(Phase::Between { trained: 0 })
            .or_default()
            .push_back(WanEvent::Connected { link: 0, round: 0 });
        for (r, round) in messages.iter().enumerate() {
            let phase = phases.entry(at(r as u64 + 1)).or_default();
            for bytes in round {
                phase.push_back(WanEvent::Message {
                    link: 0,
                    bytes: bytes.clone(),
                });
            }
        }
        Script(phases)
    }

    #[test]
    fn overlapping_the_wan_work_with_the_next_step_changes_no_byte_and_no_weight() {
        let peer = peer_messages();
        // Sequential: the peer's round r is handed over between this region's rounds r
        // and r + 1. With overlap: while round r's step runs, so it is decoded beside the
        // step and added in before round r + 1's, the same place in the sequence; or
        // between the rounds, as without overlap.
        let (sent, checkpoint, report) =
            run(false, script(&peer, |r| Phase::Between { trained: r }));
        assert_eq!(report.rounds, rounds());
        // (With overlap a round's bytes leave during the next step, so the bytes sent by
        // an evaluation differ; the weights it evaluates do not.)
        let records = |r: &AgentReport| -> Vec<(u64, u64)> {
            r.evaluations
                .iter()
                .map(|e| (e.round, e.test_accuracy.to_bits()))
                .collect()
        };
        assert_eq!(report.evaluations.len() as u64, EPOCHS);
        assert_eq!(report.overlapped_rounds, 0);
        assert!(sent.len() as u64 > rounds(), "{} messages", sent.len());
        for (label, at) in [
            (
                "during the step",
                &(|r| Phase::Step { round: r }) as &dyn Fn(u64) -> Phase,
            ),
            ("between rounds", &|r| Phase::Between { trained: r }),
        ] {
            let (o_sent, o_checkpoint, o_report) = run(true, script(&peer, at));
            assert!(
                o_report.overlapped_rounds >= rounds() - 1,
                "{label}: {} of {} rounds overlapped",
                o_report.overlapped_rounds,
                rounds()
            );
            assert_eq!(o_sent.len(), sent.len(), "{label}");
            assert!(o_sent == sent, "{label}: the messages sent differ");
            assert!(
                o_checkpoint == checkpoint,
                "{label}: the final state differs"
            );
            assert_eq!(o_report.test_loss.to_bits(), report.test_loss.to_bits());
            // Evaluated beside training: the same rounds and results as between rounds.
            assert_eq!(records(&o_report), records(&report), "{label}");
        }
    }

    /// Region 0 as the simulator runs it ([`crate::sim::region::SimRegion`], the native
    /// build of the policy), with the peer's round `r` delivered between this region's
    /// rounds `r` and `r + 1`; returns what it sent and its final test loss.
    fn simulated(policy: &str, peer: &[Vec<Vec<u8>>]) -> (Vec<Vec<u8>>, f64) {
        use crate::sim::region::{RunShape, SimRegion};
        let policy = crate::policies::builtin(policy).unwrap();
        let t = trainer(0);
        let s = sync(0, &t);
        let mut region = SimRegion::new(t, s);
        let test = embedded_digits().unwrap().test;
        let shape = RunShape {
            total_rounds: rounds(),
            base_lr: 1e-3,
            schedule: LrSchedule::Cosine { min_factor: 0.0 },
            regions: 2,
            evaluation_s: 0.0,
        };
        let stats = vec![LinkStats {
            peer: REGIONS[1].into(),
            bandwidth_bps: 100e6,
            rtt_s: 0.08,
            loss: 0.0,
            queued_bytes: 0,
        }];
        region
            .first_decision(policy.as_ref(), &shape, &stats)
            .unwrap();
        let mut sent = Vec::new();
        for round in 1..=rounds() {
            assert!(region.try_start(&shape).unwrap(), "round {round} starts");
            let (finished, outgoing) = region.finish_step(policy.as_ref(), &shape, &stats).unwrap();
            assert_eq!(finished, round);
            sent.extend(outgoing.into_iter().flat_map(|(_, messages)| messages));
            region
                .evaluate_if_due(round, rounds() / EPOCHS, &shape, &test, 0.0)
                .unwrap();
            for m in &peer[round as usize - 1] {
                region.receive(0, m).unwrap();
            }
        }
        // The run ends with every peer's last round added in.
        (sent, region.trainer.evaluate(&test).unwrap().loss)
    }

    #[test]
    fn the_core_sends_and_trains_what_the_simulators_order_does_for_the_same_deliveries() {
        let peer = peer_messages();
        for policy in ["weightgrad", "adaptive", "full-sync"] {
            let (want, want_loss) = simulated(policy, &peer);
            let (sent, _, report) = run_policy(
                policy,
                true,
                script(&peer, |r| Phase::Between { trained: r }),
            );
            assert_eq!(sent.len(), want.len(), "{policy}: messages");
            let first = sent.iter().zip(&want).position(|(a, b)| a != b);
            assert_eq!(first, None, "{policy}: the first message that differs");
            assert_eq!(report.test_loss.to_bits(), want_loss.to_bits(), "{policy}");
        }
    }
}
