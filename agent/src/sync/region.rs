//! One region's WAN state machine: a residual per peer link, policy statistics, the
//! significance filter and quantizer with error feedback, and the merge of peers' updates.
//! Sans-IO: it produces and consumes bytes; time and transport belong to the caller.

use crate::sync::clock::MirrorClock;
use crate::sync::message::{Resumed, RoundEnd, WanMessage};
use crate::sync::snapshot::Snapshot;
use std::collections::{BTreeMap, BTreeSet};
use weightgrad_codec::filter::{l2_norm, update_stats};
use weightgrad_codec::{
    CodecError, DitherRng, EncodeOptions, FrameMeta, Limits, Quantizer, Selection, Update, decode,
    encode, significant_top,
};
use weightgrad_sdk::{LinkInput, LinkPlan, LinkStats, TensorPlan, TensorRole, TensorStats};

/// Size and role of one tensor, in manifest order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorMeta {
    /// Elements.
    pub numel: usize,
    /// Weight or bias.
    pub role: TensorRole,
}

/// How peers' updates are merged into a region's weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MergeMode {
    /// Gaia / WeightGrad: every region's updates are added everywhere as they arrive.
    Sum,
    /// DiLoCo: every `every` rounds, average all regions' updates since the last anchor and
    /// take an outer Nesterov step from the anchor; in between, regions train alone.
    Mean {
        /// Rounds between outer steps.
        every: u64,
        /// Outer learning rate.
        outer_lr: f32,
        /// Outer Nesterov momentum.
        momentum: f32,
    },
}

/// Settings of the WAN level.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// How received updates are merged.
    pub merge: MergeMode,
    /// Rounds a region may run ahead of the slowest live peer.
    pub max_staleness: u64,
    /// zstd level for frames (`None`: uncompressed).
    pub zstd_level: Option<i32>,
    /// Values per scale for m-bit quantization.
    pub bucket: u32,
    /// Limits applied to every received frame.
    pub limits: Limits,
    /// Thresholds at which policies are told the significant fraction.
    pub stat_thresholds: Vec<f32>,
    /// Keep f64 sums of local updates and of what each link delivered, to check per-link
    /// conservation at any time (costs 8 bytes per parameter per link, plus one).
    pub audit: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            merge: MergeMode::Sum,
            max_staleness: 1,
            zstd_level: Some(1),
            bucket: 512,
            limits: Limits::default(),
            stat_thresholds: vec![0.001, 0.01, 0.1],
            audit: false,
        }
    }
}

/// Why a received message was refused (the region keeps running; nothing is applied).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The bytes are not a valid message.
    #[error("from {peer}: {source}")]
    Codec {
        /// Link it came from.
        peer: String,
        /// What the decoder found.
        source: CodecError,
    },
    /// An update already applied (a sender resends what a broken connection may have
    /// lost); harmless, and not applied again.
    #[error("from {peer}: duplicate update for tensor {tensor} of round {clock}")]
    Duplicate {
        /// Link it came from.
        peer: String,
        /// Tensor index.
        tensor: u32,
        /// Round.
        clock: u64,
    },
    /// The message is valid but does not fit this model or this link.
    #[error("from {peer}: {problem}")]
    Rejected {
        /// Link it came from.
        peer: String,
        /// What is wrong.
        problem: String,
    },
}

/// Byte and element counters for one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkCounters {
    /// Bytes handed to the link (frames and markers).
    pub bytes_sent: u64,
    /// Bytes received from the link.
    pub bytes_received: u64,
    /// Elements sent.
    pub elements_sent: u64,
    /// Elements received and applied.
    #[serde(default)]
    pub elements_received: u64,
    /// Frames refused.
    pub rejected: u64,
    /// Updates received again and not applied again.
    pub duplicates: u64,
    /// Steps started (see [`RegionSync::note_step_start`]).
    #[serde(default)]
    pub steps_started: u64,
    /// Σ over steps started of the rounds this region had finished beyond the peer's
    /// delivered ones: the staleness its steps actually ran at.
    #[serde(default)]
    pub rounds_behind_sum: u64,
    /// The most rounds the peer's delivered ones were behind at a step's start.
    #[serde(default)]
    pub rounds_behind_max: u64,
}

impl LinkCounters {
    /// Mean rounds the peer's delivered rounds were behind this region's finished ones
    /// when its steps started (0 before any step).
    pub fn rounds_behind_mean(&self) -> f64 {
        if self.steps_started == 0 {
            0.0
        } else {
            self.rounds_behind_sum as f64 / self.steps_started as f64
        }
    }
}

struct Link {
    peer: String,
    residual: Vec<Vec<f32>>,
    rounds_since_sent: Vec<u32>,
    rng: DitherRng,
    counters: LinkCounters,
    /// (clock, tensor) pairs applied from this peer and not yet below its complete clock.
    applied: BTreeSet<(u64, u32)>,
    /// Σ (old − new residual) over resets after the peer resumed from a snapshot: what
    /// reached it through a snapshot rather than through frames.
    adjustment: Vec<Vec<f32>>,
    /// The residual as it stood when this region served the peer a snapshot; taken out
    /// of the residual only when the peer's resume notice confirms it adopted it.
    served: Option<Vec<Vec<f32>>>,
    /// The snapshot round of the last resume notice applied (a resent notice is a
    /// duplicate, not a second reset).
    last_resume: Option<u64>,
}

/// What one round produced for one link.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Index of the link.
    pub link: usize,
    /// Messages in order: frames, then the round-end marker.
    pub messages: Vec<WanMessage>,
    /// What the receiver will decode, per tensor sent (for conservation checks).
    pub decoded: Vec<(u32, Update)>,
    /// Per frame sent: what it cost and carried (for metrics).
    pub frames: Vec<FrameStats>,
    /// Elements of the model not sent on this link this round.
    pub elements_held: u64,
}

/// One sent frame, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameStats {
    /// Tensor index.
    pub tensor: u32,
    /// The tensor's role.
    pub role: TensorRole,
    /// Bit-width the plan chose.
    pub bits: u8,
    /// Elements carried.
    pub elements: u64,
    /// Packed payload bytes before zstd.
    pub packed: u64,
    /// Payload bytes after zstd.
    pub compressed: u64,
}

/// State of the `mean` merge: the shared anchor, the outer momentum and peers' updates
/// received for outer steps not yet taken.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct OuterState {
    anchor: Vec<Vec<f32>>,
    momentum: Vec<Vec<f32>>,
    /// Sum of peers' decoded updates, by the round they belong to.
    inbox: BTreeMap<u64, Vec<Vec<f32>>>,
    last: u64,
}

/// f64 sums behind [`RegionSync::conservation_error`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Audit {
    /// Σ local updates, per tensor.
    local: Vec<Vec<f64>>,
    /// Per link: Σ decoded updates sent plus snapshot adjustments, per tensor.
    delivered: Vec<Vec<Vec<f64>>>,
}

fn add_update_f64(sum: &mut [f64], update: &Update, sign: f64) {
    match update {
        Update::Dense(v) => sum
            .iter_mut()
            .zip(v)
            .for_each(|(s, x)| *s += sign * f64::from(*x)),
        Update::Sparse { indices, values } => {
            for (&i, &x) in indices.iter().zip(values) {
                sum[i as usize] += sign * f64::from(x);
            }
        }
    }
}

/// One link's state in a checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LinkState {
    peer: String,
    residual: Vec<Vec<f32>>,
    rounds_since_sent: Vec<u32>,
    rng: u64,
    counters: LinkCounters,
    applied: Vec<(u64, u32)>,
    adjustment: Vec<Vec<f32>>,
    #[serde(default)]
    served: Option<Vec<Vec<f32>>>,
    #[serde(default)]
    last_resume: Option<u64>,
}

/// Everything a [`RegionSync`] holds, for checkpoints: restoring it resumes the region
/// exactly where it stopped.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SyncState {
    round: u64,
    clock: MirrorClock,
    links: Vec<LinkState>,
    outer: OuterState,
    audit: Option<Audit>,
}

impl SyncState {
    /// Rounds finished when it was taken.
    pub fn round(&self) -> u64 {
        self.round
    }
}

/// A peer's update checked and counted by [`RegionSync::receive_deferred`], still to be
/// added into the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Merge {
    /// Tensor index.
    pub tensor: usize,
    /// The decoded update.
    pub update: Update,
}

impl Merge {
    /// Adds the update into `weights` (sum merge).
    pub fn apply(&self, weights: &mut [Vec<f32>]) {
        self.update.add_to(&mut weights[self.tensor], 1.0);
    }
}

/// A region's WAN state: one residual per peer, the mirror clock, and counters.
pub struct RegionSync {
    name: String,
    tensors: Vec<TensorMeta>,
    links: Vec<Link>,
    clock: MirrorClock,
    config: SyncConfig,
    round: u64,
    outer: OuterState,
    audit: Option<Audit>,
}

impl RegionSync {
    /// A region named `name` with `peers` links, for a model with `tensors`; `seed` drives
    /// stochastic rounding.
    pub fn new(
        name: &str,
        peers: &[String],
        tensors: Vec<TensorMeta>,
        config: SyncConfig,
        seed: u64,
    ) -> Self {
        let links = peers
            .iter()
            .enumerate()
            .map(|(i, p)| Link {
                peer: p.clone(),
                residual: tensors.iter().map(|t| vec![0.0; t.numel]).collect(),
                rounds_since_sent: vec![0; tensors.len()],
                rng: DitherRng::new(seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1))),
                counters: LinkCounters::default(),
                applied: BTreeSet::new(),
                adjustment: tensors.iter().map(|t| vec![0.0; t.numel]).collect(),
                served: None,
                last_resume: None,
            })
            .collect();
        let zeros = || -> Vec<Vec<f64>> { tensors.iter().map(|t| vec![0.0; t.numel]).collect() };
        let audit = config.audit.then(|| Audit {
            local: zeros(),
            delivered: peers.iter().map(|_| zeros()).collect(),
        });
        Self {
            name: name.into(),
            audit,
            clock: MirrorClock::new(peers.len(), config.max_staleness),
            tensors,
            links,
            config,
            round: 0,
            outer: OuterState::default(),
        }
    }

    /// Records the starting weights (the first anchor of the `mean` merge).
    pub fn start(&mut self, weights: &[Vec<f32>]) {
        self.outer.anchor = weights.to_vec();
        self.outer.momentum = weights.iter().map(|w| vec![0.0; w.len()]).collect();
    }

    /// The round whose outer step (`mean` merge) is due before the next round may start.
    pub fn outer_due(&self) -> Option<u64> {
        match self.config.merge {
            MergeMode::Mean { every, .. }
                if self.round > self.outer.last && self.round.is_multiple_of(every.max(1)) =>
            {
                Some(self.round)
            }
            _ => None,
        }
    }

    /// Whether every live peer's round `round` has fully arrived.
    pub fn round_complete_everywhere(&self, round: u64) -> bool {
        self.clock
            .slowest_live()
            .is_none_or(|slowest| slowest >= round)
    }

    /// Takes the due outer step once every live peer's update for it has arrived: the mean
    /// of this region's change since the anchor and the peers' decoded updates is the
    /// (negated) pseudo-gradient; Nesterov momentum steps the anchor, and the weights
    /// restart from it. Returns false (changing nothing) when it is not due or not ready.
    pub fn apply_outer_step(&mut self, weights: &mut [Vec<f32>]) -> bool {
        let (
            Some(round),
            MergeMode::Mean {
                outer_lr, momentum, ..
            },
        ) = (self.outer_due(), self.config.merge)
        else {
            return false;
        };
        if !self.round_complete_everywhere(round) {
            return false;
        }
        let regions = (self.links.len() + 1) as f32;
        // Peers' updates of this round and of any earlier round not yet merged (a policy
        // may send between outer steps): all of them join this step, none is dropped.
        let due: Vec<u64> = self.outer.inbox.range(..=round).map(|(k, _)| *k).collect();
        let mut inbox: Option<Vec<Vec<f32>>> = None;
        for k in due {
            let part = self.outer.inbox.remove(&k).expect("key listed above");
            match inbox.as_mut() {
                None => inbox = Some(part),
                Some(sum) => {
                    for (s, p) in sum.iter_mut().zip(part) {
                        s.iter_mut().zip(p).for_each(|(s, p)| *s += p);
                    }
                }
            }
        }
        for (t, w) in weights.iter_mut().enumerate() {
            let anchor = &mut self.outer.anchor[t];
            let m = &mut self.outer.momentum[t];
            for i in 0..w.len() {
                let peers = inbox.as_ref().map_or(0.0, |b| b[t][i]);
                let mean = (w[i] - anchor[i] + peers) / regions;
                let g = -mean;
                m[i] = momentum * m[i] + g;
                anchor[i] -= outer_lr * (g + momentum * m[i]);
                w[i] = anchor[i];
            }
        }
        self.outer.last = round;
        true
    }

    /// This region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rounds this region has finished.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The mirror clock.
    pub fn clock(&self) -> &MirrorClock {
        &self.clock
    }

    /// Mutable mirror clock (liveness changes).
    pub fn clock_mut(&mut self) -> &mut MirrorClock {
        &mut self.clock
    }

    /// Thresholds at which policies are told the significant fraction.
    pub fn stat_thresholds(&self) -> &[f32] {
        &self.config.stat_thresholds
    }

    /// The whole state, for a checkpoint.
    pub fn export_state(&self) -> SyncState {
        SyncState {
            round: self.round,
            clock: self.clock.clone(),
            links: self
                .links
                .iter()
                .map(|l| LinkState {
                    peer: l.peer.clone(),
                    residual: l.residual.clone(),
                    rounds_since_sent: l.rounds_since_sent.clone(),
                    rng: l.rng.state(),
                    counters: l.counters,
                    applied: l.applied.iter().copied().collect(),
                    adjustment: l.adjustment.clone(),
                    served: l.served.clone(),
                    last_resume: l.last_resume,
                })
                .collect(),
            outer: self.outer.clone(),
            audit: self.audit.clone(),
        }
    }

    /// Restores a state exported from a region with the same peers and model; on error
    /// nothing changes.
    pub fn restore_state(&mut self, state: SyncState) -> Result<(), String> {
        let peers: Vec<&str> = self.links.iter().map(|l| l.peer.as_str()).collect();
        let theirs: Vec<&str> = state.links.iter().map(|l| l.peer.as_str()).collect();
        if peers != theirs {
            return Err(format!(
                "the checkpoint's peers are {theirs:?}, the configuration's {peers:?}"
            ));
        }
        let fits = |t: &[Vec<f32>]| {
            t.len() == self.tensors.len()
                && t.iter().zip(&self.tensors).all(|(v, m)| v.len() == m.numel)
        };
        if !state.links.iter().all(|l| {
            fits(&l.residual)
                && fits(&l.adjustment)
                && l.rounds_since_sent.len() == self.tensors.len()
        }) {
            return Err("the checkpoint's residuals do not fit this model".into());
        }
        if state.audit.is_some() != self.audit.is_some() {
            return Err("the checkpoint was taken with conservation auditing set otherwise".into());
        }
        self.round = state.round;
        self.clock = state.clock;
        for (link, s) in self.links.iter_mut().zip(state.links) {
            link.residual = s.residual;
            link.rounds_since_sent = s.rounds_since_sent;
            link.rng = DitherRng::new(s.rng);
            link.counters = s.counters;
            link.applied = s.applied.into_iter().collect();
            link.adjustment = s.adjustment;
            link.served = s.served.filter(|v| fits(v));
            link.last_resume = s.last_resume;
        }
        self.outer = state.outer;
        self.audit = state.audit;
        Ok(())
    }

    /// Elements in the model.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.numel).sum()
    }

    /// Number of peer links.
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Peer name of link `l`.
    pub fn peer(&self, l: usize) -> &str {
        &self.links[l].peer
    }

    /// Counters of link `l`.
    pub fn counters(&self, l: usize) -> LinkCounters {
        self.links[l].counters
    }

    /// Residual of link `l`, per tensor.
    pub fn residual(&self, l: usize) -> &[Vec<f32>] {
        &self.links[l].residual
    }

    /// What reached the peer on link `l` through snapshots instead of frames, per tensor:
    /// Σ decoded sent + adjustment + residual = Σ local updates.
    pub fn adjustment(&self, l: usize) -> &[Vec<f32>] {
        &self.links[l].adjustment
    }

    /// With auditing on, the largest per-element gap in link `l`'s invariant
    /// |Σ decoded sent + adjustments + residual − Σ local updates|, relative to the largest
    /// |Σ local update| (so 1e-6 means float rounding). `None` without auditing.
    pub fn conservation_error(&self, l: usize) -> Option<f64> {
        let a = self.audit.as_ref()?;
        let mut worst = 0.0f64;
        let mut scale = 1e-12f64;
        for ((local, delivered), residual) in a
            .local
            .iter()
            .zip(&a.delivered[l])
            .zip(&self.links[l].residual)
        {
            for ((lo, de), re) in local.iter().zip(delivered).zip(residual) {
                worst = worst.max((de + f64::from(*re) - lo).abs());
                scale = scale.max(lo.abs());
            }
        }
        Some(worst / scale)
    }

    /// Replaces link `l`'s residual, recording the difference as delivered by snapshot.
    fn reset_residual(&mut self, l: usize, new: Option<Vec<Vec<f32>>>) {
        if let (Some(a), Some(new)) = (&mut self.audit, &new) {
            for ((sum, old), new) in a.delivered[l]
                .iter_mut()
                .zip(&self.links[l].residual)
                .zip(new)
            {
                for ((s, o), n) in sum.iter_mut().zip(old).zip(new) {
                    *s += f64::from(*o) - f64::from(*n);
                }
            }
        } else if let Some(a) = &mut self.audit {
            for (sum, old) in a.delivered[l].iter_mut().zip(&self.links[l].residual) {
                sum.iter_mut()
                    .zip(old)
                    .for_each(|(s, o)| *s += f64::from(*o));
            }
        }
        let link = &mut self.links[l];
        let new = new.unwrap_or_else(|| self.tensors.iter().map(|t| vec![0.0; t.numel]).collect());
        for ((adj, old), new) in link.adjustment.iter_mut().zip(&link.residual).zip(&new) {
            for ((a, o), n) in adj.iter_mut().zip(old).zip(new) {
                *a += o - n;
            }
        }
        link.residual = new;
    }

    /// Empties every link's residual, recording what was in them as adjustments (after a
    /// crash, the peers already hold what the lost rounds sent; resending the old
    /// residuals would apply that part twice).
    pub fn clear_residuals(&mut self) {
        for l in 0..self.links.len() {
            self.reset_residual(l, None);
        }
    }

    /// This region's state for the peer on link `l`, which rejoins without its own.
    /// Everything in the link's residual is in the weights the peer adopts; it is taken out
    /// of the residual when the peer's resume notice confirms the adoption (a snapshot lost
    /// on the way costs nothing).
    pub fn snapshot_for(&mut self, l: usize, weights: &[Vec<f32>], manifest: &str) -> Snapshot {
        self.links[l].served = Some(self.links[l].residual.clone());
        Snapshot {
            source: self.name.clone(),
            round: self.round,
            manifest: manifest.to_string(),
            complete: (0..self.links.len())
                .map(|p| (self.links[p].peer.clone(), self.clock.complete(p)))
                .collect(),
            weights: weights.to_vec(),
        }
    }

    /// Adopts a peer's snapshot: its weights replace `weights`, this region continues from
    /// its round, and every peer's rounds the snapshot holds count as arrived. Returns the
    /// notice to send every peer. Nothing changes if the snapshot does not fit the model.
    pub fn adopt(
        &mut self,
        snapshot: &Snapshot,
        weights: &mut Vec<Vec<f32>>,
    ) -> Result<WanMessage, String> {
        let Some(source) = self.links.iter().position(|k| k.peer == snapshot.source) else {
            return Err(format!("snapshot from {:?}, not a peer", snapshot.source));
        };
        if snapshot.weights.len() != self.tensors.len()
            || snapshot
                .weights
                .iter()
                .zip(&self.tensors)
                .any(|(w, m)| w.len() != m.numel)
        {
            return Err(format!(
                "snapshot from {} does not fit this model's tensors",
                snapshot.source
            ));
        }
        if snapshot.weights.iter().flatten().any(|v| !v.is_finite()) {
            return Err(format!(
                "snapshot from {} holds non-finite weights",
                snapshot.source
            ));
        }
        *weights = snapshot.weights.clone();
        self.round = self.round.max(snapshot.round);
        self.clock.skip_to(source, snapshot.round);
        for (name, complete) in &snapshot.complete {
            if let Some(p) = self.links.iter().position(|k| &k.peer == name) {
                self.clock.skip_to(p, *complete);
            }
        }
        self.outer.anchor = weights.clone();
        self.outer.last = self.round;
        Ok(WanMessage::Resumed(Resumed {
            sender: self.name.clone(),
            after: snapshot.round,
            source: snapshot.source.clone(),
        }))
    }

    /// Notes that the step of `round` starts now: for every link, how many rounds this
    /// region has finished (`round - 1`, a round whose WAN work is still pending included)
    /// beyond the peer's delivered ones. Both the agent and the simulator call it, so
    /// the staleness each ran at can be compared.
    pub fn note_step_start(&mut self, round: u64) {
        for (l, link) in self.links.iter_mut().enumerate() {
            let behind = round
                .saturating_sub(1)
                .saturating_sub(self.clock.complete(l));
            let c = &mut link.counters;
            c.steps_started += 1;
            c.rounds_behind_sum += behind;
            c.rounds_behind_max = c.rounds_behind_max.max(behind);
        }
    }

    /// Whether the next round may start: under the staleness bound, and with no outer
    /// step pending.
    pub fn may_start_next(&self) -> bool {
        self.clock.may_start(self.round + 1) && self.outer_due().is_none()
    }

    /// Whether the round after the next may start while the next one's updates are still
    /// being encoded (see [`Self::finish_round`]): under the staleness bound as if the
    /// next round were finished. Never with a mean merge, whose outer steps need every
    /// round finished first.
    pub fn may_start_beyond_next(&self) -> bool {
        matches!(self.config.merge, MergeMode::Sum) && self.clock.may_start(self.round + 2)
    }

    /// Adds this region's own update (new weights minus old, per tensor) to every link's residual.
    pub fn add_local_update(&mut self, delta: &[Vec<f32>]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: this CPU has AVX2 (checked just above).
            return unsafe { self.add_local_update_avx2(delta) };
        }
        self.add_local_update_portable(delta);
    }

    /// [`Self::add_local_update_portable`] compiled with AVX2: the same additions, eight
    /// lanes at once (so the same bits).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn add_local_update_avx2(&mut self, delta: &[Vec<f32>]) {
        self.add_local_update_portable(delta);
    }

    /// [`Self::add_local_update`] as written.
    #[inline(always)]
    fn add_local_update_portable(&mut self, delta: &[Vec<f32>]) {
        if let Some(a) = &mut self.audit {
            for (sum, d) in a.local.iter_mut().zip(delta) {
                sum.iter_mut().zip(d).for_each(|(s, x)| *s += f64::from(*x));
            }
        }
        for link in &mut self.links {
            for (acc, d) in link.residual.iter_mut().zip(delta) {
                for (a, v) in acc.iter_mut().zip(d) {
                    *a += v;
                }
            }
        }
    }

    /// Per-link statistics of every tensor's residual, for the policy.
    pub fn policy_links(&self, weights: &[Vec<f32>], link_stats: &[LinkStats]) -> Vec<LinkInput> {
        // The weights are the same for every link: their norms are taken once.
        let weight_l2: Vec<f32> = weights.iter().map(|w| l2_norm(w)).collect();
        self.links
            .iter()
            .zip(link_stats)
            .map(|(link, stats)| LinkInput {
                link: stats.clone(),
                tensors: link
                    .residual
                    .iter()
                    .zip(weights)
                    .zip(&weight_l2)
                    .zip(&self.tensors)
                    .zip(&link.rounds_since_sent)
                    .map(|((((acc, w), &weight_l2), meta), &since)| {
                        let update = update_stats(acc, w, &self.config.stat_thresholds);
                        TensorStats {
                            numel: meta.numel as u64,
                            role: meta.role,
                            update_l2: update.update_l2,
                            weight_l2,
                            max_relative: update.max_relative,
                            significant_fraction: update.significant_fraction,
                            rounds_since_sent: since,
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// Ends the current round: for every link, applies its plan (filter, quantize, encode,
    /// error feedback) and returns the messages to send. `plans` has one entry per link.
    pub fn finish_round(
        &mut self,
        weights: &[Vec<f32>],
        plans: &[LinkPlan],
    ) -> Result<Vec<Outgoing>, CodecError> {
        self.round += 1;
        let round = self.round;
        let mut out = Vec::with_capacity(self.links.len());
        for (l, (link, plan)) in self.links.iter_mut().zip(plans).enumerate() {
            let mut messages = Vec::new();
            let mut decoded = Vec::new();
            let mut frames = Vec::new();
            let mut elements_sent = 0u64;
            for (t, tensor_plan) in plan.tensors.iter().enumerate() {
                let acc = &mut link.residual[t];
                if !tensor_plan.send {
                    link.rounds_since_sent[t] = link.rounds_since_sent[t].saturating_add(1);
                    continue;
                }
                let cap = top_count(acc.len(), tensor_plan.top_fraction);
                let selection = significant_top(acc, &weights[t], tensor_plan.tau, cap);
                if selection.is_empty() {
                    link.rounds_since_sent[t] = link.rounds_since_sent[t].saturating_add(1);
                    continue;
                }
                let meta = FrameMeta {
                    sender: self.name.clone(),
                    clock: round,
                    tensor: t as u32,
                };
                let opts = EncodeOptions {
                    quantizer: quantizer_for(tensor_plan, self.config.bucket),
                    zstd_level: self.config.zstd_level,
                };
                let Selection { indices, values } = selection;
                let update = Update::Sparse { indices, values };
                let enc = encode(&meta, acc.len(), &update, &opts, &mut link.rng)?;
                // Error feedback: what was taken out but not delivered goes back in.
                update.add_to(acc, 1.0);
                enc.decoded.add_to(acc, -1.0);
                link.counters.bytes_sent += enc.bytes.len() as u64;
                link.counters.elements_sent += update.value_count() as u64;
                elements_sent += update.value_count() as u64;
                frames.push(FrameStats {
                    tensor: t as u32,
                    role: self.tensors[t].role,
                    bits: tensor_plan.bits,
                    elements: update.value_count() as u64,
                    packed: enc.packed_len as u64,
                    compressed: enc.compressed_len as u64,
                });
                link.rounds_since_sent[t] = 0;
                if let Some(a) = &mut self.audit {
                    add_update_f64(&mut a.delivered[l][t], &enc.decoded, 1.0);
                }
                messages.push(WanMessage::Frame(enc.bytes));
                decoded.push((t as u32, enc.decoded));
            }
            let end = WanMessage::RoundEnd(RoundEnd {
                sender: self.name.clone(),
                clock: round,
                frames: messages.len() as u32,
            });
            link.counters.bytes_sent += end.wire_len() as u64;
            messages.push(end);
            let numel: u64 = self.tensors.iter().map(|t| t.numel as u64).sum();
            out.push(Outgoing {
                link: l,
                messages,
                decoded,
                frames,
                elements_held: numel.saturating_sub(elements_sent),
            });
        }
        Ok(out)
    }

    /// Handles bytes from link `l`: a frame is validated and added into `weights` (sum
    /// merge); a marker advances the mirror clock. Bad or duplicate input is refused with
    /// an error and changes nothing.
    pub fn receive(
        &mut self,
        l: usize,
        bytes: &[u8],
        weights: &mut [Vec<f32>],
    ) -> Result<(), ReceiveError> {
        if let Some(merge) = self.receive_deferred(l, bytes)? {
            merge.apply(weights);
        }
        Ok(())
    }

    /// [`Self::receive`] without touching the weights: everything is checked, counted and
    /// recorded (the clock, duplicates) as by `receive`, and a frame to add into the
    /// weights (sum merge) is returned for the caller to [`Merge::apply`] before it next
    /// reads them. An agent decodes this way while its next step is using the weights.
    pub fn receive_deferred(
        &mut self,
        l: usize,
        bytes: &[u8],
    ) -> Result<Option<Merge>, ReceiveError> {
        let peer = self.links[l].peer.clone();
        let result = self.receive_inner(l, &peer, bytes);
        let link = &mut self.links[l];
        link.counters.bytes_received += bytes.len() as u64;
        match result {
            Err(ReceiveError::Duplicate { .. }) => link.counters.duplicates += 1,
            Err(_) => link.counters.rejected += 1,
            Ok(_) => {}
        }
        result
    }

    fn receive_inner(
        &mut self,
        l: usize,
        peer: &str,
        bytes: &[u8],
    ) -> Result<Option<Merge>, ReceiveError> {
        let codec = |source| ReceiveError::Codec {
            peer: peer.to_string(),
            source,
        };
        let reject = |problem: String| ReceiveError::Rejected {
            peer: peer.to_string(),
            problem,
        };
        match WanMessage::from_bytes(bytes).map_err(codec)? {
            WanMessage::Resumed(r) => {
                if r.sender != peer {
                    return Err(reject(format!("notice claims sender {:?}", r.sender)));
                }
                if self.links[l].last_resume == Some(r.after) {
                    return Err(ReceiveError::Duplicate {
                        peer: peer.to_string(),
                        tensor: u32::MAX,
                        clock: r.after,
                    });
                }
                self.links[l].last_resume = Some(r.after);
                self.clock.skip_to(l, r.after);
                self.prune_applied(l);
                // The peer now holds what `source` held. The source takes out of its
                // residual what it held when it served the snapshot (what came later stays);
                // every other region's residual for the peer becomes its residual for the
                // source (approximately what the snapshot lacks of this region's updates).
                if r.source == self.name {
                    if let Some(served) = self.links[l].served.take() {
                        let rest = self.links[l]
                            .residual
                            .iter()
                            .zip(&served)
                            .map(|(now, then)| now.iter().zip(then).map(|(n, t)| n - t).collect())
                            .collect();
                        self.reset_residual(l, Some(rest));
                    }
                } else {
                    let copy = self
                        .links
                        .iter()
                        .find(|k| k.peer == r.source)
                        .map(|k| k.residual.clone());
                    self.reset_residual(l, copy);
                }
                Ok(None)
            }
            WanMessage::RoundEnd(end) => {
                if end.sender != peer {
                    return Err(reject(format!("marker claims sender {:?}", end.sender)));
                }
                self.clock.round_ended(l, end.clock, end.frames);
                self.prune_applied(l);
                Ok(None)
            }
            WanMessage::Frame(frame) => {
                let frame = decode(&frame, &self.config.limits).map_err(codec)?;
                let h = &frame.header;
                if h.sender != peer {
                    return Err(reject(format!("frame claims sender {:?}", h.sender)));
                }
                let Some(meta) = self.tensors.get(h.tensor as usize) else {
                    return Err(reject(format!(
                        "tensor {} does not exist (the model has {})",
                        h.tensor,
                        self.tensors.len()
                    )));
                };
                if h.len as usize != meta.numel {
                    return Err(reject(format!(
                        "tensor {} has {} elements, the frame says {}",
                        h.tensor, meta.numel, h.len
                    )));
                }
                if h.clock <= self.clock.complete(l)
                    || !self.links[l].applied.insert((h.clock, h.tensor))
                {
                    return Err(ReceiveError::Duplicate {
                        peer: peer.to_string(),
                        tensor: h.tensor,
                        clock: h.clock,
                    });
                }
                let tensor = h.tensor as usize;
                let clock = h.clock;
                self.links[l].counters.elements_received += frame.update.value_count() as u64;
                self.clock.frame_arrived(l, clock);
                self.prune_applied(l);
                match self.config.merge {
                    MergeMode::Sum => Ok(Some(Merge {
                        tensor,
                        update: frame.update,
                    })),
                    MergeMode::Mean { .. } => {
                        let tensors = &self.tensors;
                        let slot = self.outer.inbox.entry(clock).or_insert_with(|| {
                            tensors.iter().map(|m| vec![0.0; m.numel]).collect()
                        });
                        frame.update.add_to(&mut slot[tensor], 1.0);
                        Ok(None)
                    }
                }
            }
        }
    }

    fn prune_applied(&mut self, l: usize) {
        let complete = self.clock.complete(l);
        let applied = &mut self.links[l].applied;
        while applied.first().is_some_and(|&(c, _)| c <= complete) {
            applied.pop_first();
        }
    }
}

/// How many of `len` elements a plan's `top_fraction` lets through (at least one; all of
/// them at 1 or more).
fn top_count(len: usize, fraction: f32) -> usize {
    if fraction >= 1.0 {
        return usize::MAX;
    }
    ((len as f64 * f64::from(fraction.max(0.0))).ceil() as usize).max(1)
}

/// The quantizer for a plan's bit-width.
pub fn quantizer_for(plan: &TensorPlan, bucket: u32) -> Quantizer {
    match plan.bits {
        32 => Quantizer::Fp32,
        16 => Quantizer::Bf16,
        b => Quantizer::Uniform {
            bits: b.clamp(1, 8),
            bucket,
            clip_sigma: None,
        },
    }
}
