//! The agent's core loop: trains rounds, asks the policy, hands each link its messages,
//! applies what peers send, tracks peer liveness, and serves or adopts snapshots. It owns
//! every piece of training and sync state and runs on its own thread; the WAN tasks talk to
//! it through [`WanEvent`]s.

use super::checkpoint::AgentCheckpoint;
use super::liveness::{Liveness, LivenessChange};
use super::status::{ByteTotals, PeerStatus, PolicyStatus, Status, now_rfc3339};
use crate::lan::RegionTrainer;
use crate::policy::PolicyRuntime;
use crate::sync::{ReceiveError, RegionSync, decode_snapshot, encode_snapshot};
use crate::telemetry as m;
use crate::train::Dataset;
use crate::train::schedule::LrSchedule;
use crate::wan::inbound::Acceptor;
use crate::wan::link::{LinkSender, WanEvent};
use anyhow::{Result, anyhow};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use weightgrad_sdk::{LanPlan, LinkStats, PolicyInput, RoundContext, TensorPlan};

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
    /// Per-link conservation gap relative to the largest Σ local update (float rounding:
    /// about 1e-6); absent when the model is too large to audit.
    pub conservation_error: Option<f64>,
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
    /// Mean wall time of this region's own work per round (step, policy, encoding,
    /// evaluations), seconds: what the simulator's per-step compute cost stands for.
    pub busy_seconds_per_round: f64,
    /// Wall time spent decoding and merging peers' updates, per round of its own, seconds:
    /// work on the same thread, between its rounds, that the simulator's merges do in no
    /// time.
    pub receive_seconds_per_round: f64,
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
    /// Test set.
    pub test: Dataset,
    /// Outgoing links, by link index.
    pub links: Vec<LinkSender>,
    /// Configured link bandwidth (bit/s) and RTT (s), the policy's prior.
    pub configured: (f64, f64),
    /// Rounds in the run.
    pub total_rounds: u64,
    /// Rounds per epoch (evaluation points).
    pub steps_per_epoch: u64,
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
    busy: Duration,
    busy_rounds: u64,
    /// Time in decoding and merging peers' updates.
    receiving: Duration,
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

    fn handle(&mut self, st: &mut LoopState, event: WanEvent, now: Duration) {
        match event {
            WanEvent::Message { link, bytes } => {
                st.wan_received += bytes.len() as u64;
                let peer = self.sync.peer(link).to_string();
                metrics::counter!(m::WAN_BYTES_RECEIVED, "peer" => peer.clone())
                    .increment(bytes.len() as u64);
                let began = Instant::now();
                let received = self.sync.receive(link, &bytes, &mut self.trainer.weights);
                st.receiving += began.elapsed();
                match received {
                    Ok(()) => {
                        metrics::counter!(m::WAN_DECODED_BYTES_RECEIVED, "peer" => peer.clone())
                            .absolute(self.sync.counters(link).elements_received * 4);
                    }
                    Err(e @ ReceiveError::Duplicate { .. }) => tracing::debug!("{e}"),
                    Err(e) => {
                        metrics::counter!(m::MESSAGES_REJECTED, "peer" => peer).increment(1);
                        tracing::warn!("refused a WAN message: {e}");
                    }
                }
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

    fn train_round(&mut self, st: &mut LoopState, schedule: &LrSchedule) -> Result<()> {
        let round_start = Instant::now();
        if let Some(prev) = st.last_round_start.replace(round_start) {
            metrics::histogram!(m::ROUND_SECONDS).record(prev.elapsed().as_secs_f64());
        }
        let lr = schedule.lr_at(self.lr, self.sync.round(), self.total_rounds);
        let step_start = Instant::now();
        let step = self.trainer.step(&st.lan_plan, lr)?;
        metrics::histogram!(m::STEP_SECONDS).record(step_start.elapsed().as_secs_f64());
        st.loss = Some(step.loss);
        self.sync.add_local_update(&step.delta);
        let round = self.sync.round() + 1;
        let context = RoundContext {
            round,
            lr: lr as f32,
            base_lr: self.lr as f32,
            loss: step.loss,
            regions: self.regions,
            final_round: round == self.total_rounds,
        };
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
        let mut plans = decision.output.links;
        // Excluded peers get nothing: their updates wait in the residual.
        for (l, plan) in plans.iter_mut().enumerate() {
            if !st.liveness.is_live(l) {
                plan.tensors.iter_mut().for_each(|t| *t = TensorPlan::HOLD);
            }
        }
        let outgoing = self.sync.finish_round(&self.trainer.weights, &plans)?;
        st.lan_plan = decision.output.lan;
        st.policy_state = decision.output.state;
        let numel: u64 = self.sync.numel() as u64;
        for o in outgoing {
            let peer = self.sync.peer(o.link).to_string();
            let mut sent_bytes = 0u64;
            for msg in o.messages {
                let bytes = msg.to_bytes();
                sent_bytes += bytes.len() as u64;
                self.links[o.link].send(bytes);
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
                let kind = if f.bias { "bias" } else { "weight" };
                metrics::histogram!(m::BITS_CHOSEN, "peer" => peer.clone(), "kind" => kind)
                    .record(f64::from(f.bits));
                if f.compressed > 0 {
                    metrics::histogram!(m::ZSTD_RATIO)
                        .record(f.packed as f64 / f.compressed as f64);
                }
            }
        }
        self.round.store(round, Ordering::Relaxed);
        metrics::gauge!(m::ROUND).set(round as f64);
        metrics::gauge!(m::LOSS).set(f64::from(step.loss));
        metrics::counter!(m::LAN_BYTES).absolute(self.trainer.lan_bytes());
        if round.is_multiple_of(self.steps_per_epoch) || round == self.total_rounds {
            let e = self.trainer.evaluate(&self.test)?;
            st.accuracy = Some(e.accuracy);
            metrics::gauge!(m::ACCURACY).set(e.accuracy);
            tracing::info!(
                round,
                epoch = round / self.steps_per_epoch,
                loss = step.loss,
                test_accuracy = e.accuracy,
                wan_bytes = st.wan_sent,
                "round"
            );
        }
        Ok(())
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
    fn quiesce(&mut self, st: &mut LoopState, events: &Receiver<WanEvent>, patience: Duration) {
        let start = Instant::now();
        while start.elapsed() < patience
            && self.links.iter().any(|l| {
                l.shared().connected.load(Ordering::Relaxed)
                    && l.shared().unacked_messages.load(Ordering::Relaxed) > 0
            })
        {
            if let Ok(ev) = events.recv_timeout(Duration::from_millis(20)) {
                let now = start.elapsed();
                self.handle(st, ev, now);
            }
        }
        self.acceptor.close();
        let now = start.elapsed();
        while let Ok(ev) = events.try_recv() {
            self.handle(st, ev, now);
        }
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
    pub fn run(mut self, events: Receiver<WanEvent>) -> Result<AgentReport> {
        let start = Instant::now();
        let schedule = LrSchedule::Cosine { min_factor: 0.0 };
        let n = self.links.len();
        let mut st = LoopState {
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
            busy: Duration::ZERO,
            busy_rounds: 0,
            receiving: Duration::ZERO,
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
        // Every decision failure kind starts at 0, so the first failure is an increase.
        for kind in crate::policy::PolicyFailure::DECISION_KINDS {
            metrics::counter!(m::POLICY_FAILURES, "kind" => kind).increment(0);
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
            while let Ok(ev) = events.try_recv() {
                self.handle(&mut st, ev, now);
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
                interrupted = self.sync.round() < self.total_rounds;
                break;
            }
            if self.finished(&st) {
                training_seconds = st.first_round_start.map(|t| t.elapsed().as_secs_f64());
                break;
            }
            self.sync.apply_outer_step(&mut self.trainer.weights);
            let may_train = st.liveness.settled()
                && st.fetching.is_none()
                && self.sync.round() < self.total_rounds
                && self.sync.may_start_next();
            if may_train {
                // A swap lands between rounds: look before asking the policy.
                self.publish_policy_change(&mut st);
                st.state = "training";
                let began = Instant::now();
                st.first_round_start.get_or_insert(began);
                st.fresh = false;
                self.train_round(&mut st, &schedule)?;
                st.busy += began.elapsed();
                st.busy_rounds += 1;
                if self.checkpoint_every > 0
                    && self.sync.round().is_multiple_of(self.checkpoint_every)
                {
                    self.save_checkpoint(&st, false);
                }
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
            match events.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => self.handle(&mut st, ev, start.elapsed()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(anyhow!("the WAN tasks stopped"));
                }
            }
        }
        st.state = if interrupted { "stopping" } else { "finished" };
        self.publish(&mut st);
        // Flush what the plan sent, take in what peers handed over, then checkpoint.
        self.quiesce(&mut st, &events, Duration::from_secs(10));
        self.save_checkpoint(&st, true);
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
                    conservation_error: self.sync.conservation_error(l),
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
            busy_seconds_per_round: st.busy.as_secs_f64() / st.busy_rounds.max(1) as f64,
            receive_seconds_per_round: st.receiving.as_secs_f64() / st.busy_rounds.max(1) as f64,
            interrupted,
            tls_refusals: self.wan_counters.tls_refusals.load(Ordering::Relaxed),
            handshake_refusals: self.wan_counters.handshake_refusals.load(Ordering::Relaxed),
            bad_streams: self.wan_counters.bad_streams.load(Ordering::Relaxed),
            links,
        })
    }
}
