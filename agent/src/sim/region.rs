//! One simulated region: the order of a round (step; its update into the residuals, the
//! policy's decision and the round's WAN work; the evaluation where one is due) apart from
//! the virtual clock and links around it. `sim::run` drives one per region from its events;
//! the agent's core is tested against it for the same deliveries of peers' messages.

use crate::lan::RegionTrainer;
use crate::sync::{ReceiveError, RegionSync};
use crate::train::dataset::Dataset;
use crate::train::schedule::LrSchedule;
use anyhow::Result;
use weightgrad_sdk::{LanPlan, LinkStats, Policy, PolicyInput, RoundContext, validate_output};

/// What every region of a run shares: its length, learning rate and size.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    /// Rounds each region trains.
    pub total_rounds: u64,
    /// Base learning rate (Adam; the schedule scales it over the run).
    pub base_lr: f64,
    /// The learning-rate schedule over the run.
    pub schedule: LrSchedule,
    /// Regions in the run.
    pub regions: u32,
    /// Virtual seconds an evaluation holds its region before its next step (0: an
    /// evaluation takes no time). The agents evaluate between two steps, so their links
    /// drain meanwhile; spreading that time over every step instead would not.
    pub evaluation_s: f64,
}

/// One link's messages from a round: the link's index and each message's bytes, in order.
pub type LinkMessages = (usize, Vec<Vec<u8>>);

/// An evaluation of a region: when, the WAN and LAN bytes it had sent by then, top-1.
#[derive(Debug, Clone, Copy)]
pub struct RegionEval {
    /// Virtual seconds.
    pub at: f64,
    /// WAN bytes this region had sent.
    pub wan_sent: u64,
    /// LAN bytes this region had moved.
    pub lan_bytes: u64,
    /// Test top-1.
    pub accuracy: f64,
}

/// One region's trainer and WAN state, and where it is in its round.
pub struct SimRegion {
    /// The region's workers, aggregator and weights.
    pub trainer: RegionTrainer,
    /// The region's WAN state machine.
    pub sync: RegionSync,
    /// The update and loss of the step under way, if one is.
    pending: Option<(Vec<Vec<f32>>, f32)>,
    lan_plan: LanPlan,
    state: Vec<u8>,
    wan_sent: u64,
    evals: Vec<RegionEval>,
    /// An evaluation holds the region: no step starts until [`Self::resume`].
    held: bool,
}

impl SimRegion {
    /// A region that has not decided anything yet: full-precision LAN, empty policy state.
    pub fn new(trainer: RegionTrainer, sync: RegionSync) -> Self {
        Self {
            trainer,
            sync,
            pending: None,
            lan_plan: LanPlan::FULL_PRECISION,
            state: Vec::new(),
            wan_sent: 0,
            evals: Vec::new(),
            held: false,
        }
    }

    /// WAN bytes the region has sent.
    pub fn wan_sent(&self) -> u64 {
        self.wan_sent
    }

    /// Its evaluations so far, in order.
    pub fn evals(&self) -> &[RegionEval] {
        &self.evals
    }

    /// The first LAN plan: the policy asked once, at round 0, with empty residuals.
    pub fn first_decision(
        &mut self,
        policy: &dyn Policy,
        shape: &RunShape,
        links: &[LinkStats],
    ) -> Result<()> {
        let context = RoundContext {
            round: 0,
            lr: shape.base_lr as f32,
            base_lr: shape.base_lr as f32,
            loss: f32::NAN,
            regions: shape.regions,
            final_round: false,
        };
        let out = self.decide(policy, context, links)?;
        self.lan_plan = out.lan;
        self.state = out.state;
        Ok(())
    }

    /// Starts the next step if none is under way, no evaluation holds the region, rounds
    /// are left and the staleness bound allows (a due outer step of the mean merge runs
    /// first); true if it started. The step's result is kept until [`Self::finish_step`].
    pub fn try_start(&mut self, shape: &RunShape) -> Result<bool> {
        if self.pending.is_some() || self.held {
            return Ok(false);
        }
        // A due outer step (mean merge) runs once every peer's update for it has arrived.
        self.sync.apply_outer_step(&mut self.trainer.weights);
        if self.sync.round() >= shape.total_rounds || !self.sync.may_start_next() {
            return Ok(false);
        }
        let lr = shape
            .schedule
            .lr_at(shape.base_lr, self.sync.round(), shape.total_rounds);
        self.sync.note_step_start(self.sync.round() + 1);
        let step = self.trainer.step(&self.lan_plan, lr)?;
        self.pending = Some((step.delta, step.loss));
        Ok(true)
    }

    /// Ends the step under way: its update joins every link's residual, the policy decides
    /// on `links` as they stand, and the round's WAN work runs. Returns the round and, per
    /// link that sends, its messages' bytes in order.
    pub fn finish_step(
        &mut self,
        policy: &dyn Policy,
        shape: &RunShape,
        links: &[LinkStats],
    ) -> Result<(u64, Vec<LinkMessages>)> {
        let round = self.sync.round() + 1;
        let lr = shape
            .schedule
            .lr_at(shape.base_lr, round - 1, shape.total_rounds);
        let (delta, loss) = self
            .pending
            .take()
            .ok_or_else(|| anyhow::anyhow!("{}: no step under way", self.sync.name()))?;
        self.sync.add_local_update(&delta);
        let context = RoundContext {
            round,
            lr: lr as f32,
            base_lr: shape.base_lr as f32,
            loss,
            regions: shape.regions,
            final_round: round == shape.total_rounds,
        };
        let out = self.decide(policy, context, links)?;
        let outgoing = self.sync.finish_round(&self.trainer.weights, &out.links)?;
        self.lan_plan = out.lan;
        self.state = out.state;
        let sent = outgoing
            .into_iter()
            .map(|o| {
                let messages: Vec<Vec<u8>> = o.messages.iter().map(|m| m.to_bytes()).collect();
                self.wan_sent += messages.iter().map(|m| m.len() as u64).sum::<u64>();
                (o.link, messages)
            })
            .collect();
        Ok((round, sent))
    }

    /// Evaluates on `test` if `round` is one to evaluate (every `every` rounds, and the
    /// last), starting at virtual time `at`, and records it when it ends, as an agent
    /// records its own. Where evaluations take time ([`RunShape::evaluation_s`]), the
    /// region is held until [`Self::resume`]: returns when the evaluation ends.
    pub fn evaluate_if_due(
        &mut self,
        round: u64,
        every: u64,
        shape: &RunShape,
        test: &Dataset,
        at: f64,
    ) -> Result<Option<f64>> {
        if !(round.is_multiple_of(every) || round == shape.total_rounds) {
            return Ok(None);
        }
        let e = self.trainer.evaluate(test)?;
        let ends = at + shape.evaluation_s;
        self.evals.push(RegionEval {
            at: ends,
            wan_sent: self.wan_sent,
            lan_bytes: self.trainer.lan_bytes(),
            accuracy: e.accuracy,
        });
        self.held = shape.evaluation_s > 0.0;
        Ok(self.held.then_some(ends))
    }

    /// The evaluation holding the region has ended: its next step may start.
    pub fn resume(&mut self) {
        self.held = false;
    }

    /// A peer's message on link `link`, merged into the weights now.
    pub fn receive(&mut self, link: usize, bytes: &[u8]) -> Result<(), ReceiveError> {
        self.sync.receive(link, bytes, &mut self.trainer.weights)
    }

    /// The policy's decision on the region as it stands, checked.
    fn decide(
        &self,
        policy: &dyn Policy,
        context: RoundContext,
        links: &[LinkStats],
    ) -> Result<weightgrad_sdk::PolicyOutput> {
        let input = PolicyInput {
            context,
            thresholds: self.sync.stat_thresholds().to_vec(),
            links: self.sync.policy_links(&self.trainer.weights, links),
            lan: self.trainer.lan_input(),
            state: self.state.clone(),
        };
        let out = policy.decide(&input);
        validate_output(&input, &out)
            .map_err(|e| anyhow::anyhow!("policy output for {}: {e}", self.sync.name()))?;
        Ok(out)
    }
}
