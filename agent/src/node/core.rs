//! The agent's core loop: trains rounds, asks the policy, hands each link its messages,
//! applies what peers send, tracks peer liveness, and serves or adopts snapshots. It owns
//! every piece of training and sync state and runs on its own thread; the WAN tasks talk to
//! it through [`WanEvent`]s.

use super::liveness::{Liveness, LivenessChange};
use crate::lan::RegionTrainer;
use crate::policy::PolicyRuntime;
use crate::sync::{ReceiveError, RegionSync, decode_snapshot, encode_snapshot};
use crate::train::Dataset;
use crate::train::schedule::LrSchedule;
use crate::wan::link::{LinkSender, WanEvent};
use anyhow::{Result, anyhow};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
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
    /// Measured goodput to it while busy, bit/s.
    pub goodput_bps: f64,
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
                match self.sync.receive(link, &bytes, &mut self.trainer.weights) {
                    Ok(()) => {}
                    Err(e @ ReceiveError::Duplicate { .. }) => tracing::debug!("{e}"),
                    Err(e) => tracing::warn!("refused a WAN message: {e}"),
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
                        Ok((snap.round, notice))
                    });
                match outcome {
                    Ok((round, notice)) => {
                        st.adopted += 1;
                        self.round.store(self.sync.round(), Ordering::Relaxed);
                        tracing::info!(
                            peer = self.sync.peer(link),
                            round,
                            "adopted the peer's model; resuming from its round"
                        );
                        let bytes = notice.to_bytes();
                        for l in &self.links {
                            st.wan_sent += bytes.len() as u64;
                            l.send(bytes.clone());
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

    /// A region far behind a reachable peer (it was excluded, or restarted without its
    /// state) takes that peer's model instead of training on from a stale one.
    fn maybe_fetch(&mut self, st: &mut LoopState, now: Duration) {
        if st.fetching.is_some() || st.fetch_retry_at.is_some_and(|t| now < t) {
            return;
        }
        let behind = self.sync.round() + self.sync.clock().max_staleness() + 1;
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
        let lr = schedule.lr_at(self.lr, self.sync.round(), self.total_rounds);
        let step = self.trainer.step(&st.lan_plan, lr)?;
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
        let decision = self.policy.decide_round(&input);
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
        for o in outgoing {
            for m in o.messages {
                let bytes = m.to_bytes();
                st.wan_sent += bytes.len() as u64;
                self.links[o.link].send(bytes);
            }
        }
        self.round.store(round, Ordering::Relaxed);
        if round.is_multiple_of(self.steps_per_epoch) || round == self.total_rounds {
            let e = self.trainer.evaluate(&self.test)?;
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
        };
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
        let mut interrupted = false;
        loop {
            let now = start.elapsed();
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
                break;
            }
            self.sync.apply_outer_step(&mut self.trainer.weights);
            let may_train = st.liveness.settled()
                && st.fetching.is_none()
                && self.sync.round() < self.total_rounds
                && self.sync.may_start_next();
            if may_train {
                self.train_round(&mut st, &schedule)?;
                continue;
            }
            match events.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => self.handle(&mut st, ev, start.elapsed()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(anyhow!("the WAN tasks stopped"));
                }
            }
        }
        let e = self.trainer.evaluate(&self.test)?;
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
                    goodput_bps: shared.goodput_bps(),
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
            interrupted,
            tls_refusals: self.wan_counters.tls_refusals.load(Ordering::Relaxed),
            handshake_refusals: self.wan_counters.handshake_refusals.load(Ordering::Relaxed),
            bad_streams: self.wan_counters.bad_streams.load(Ordering::Relaxed),
            links,
        })
    }
}
