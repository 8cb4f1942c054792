//! The active policy, its rollback target, the failure strategy and hot swap.
//!
//! A swap verifies the component (size, digest, contract), compiles it, runs a self-test on
//! a golden input, and only then replaces the active policy between rounds; the old one
//! stays as the rollback target. A failing call never stops the agent: the configured
//! strategy decides what the round does instead, and the failure is counted by kind.

use crate::policy::host::{CompiledPolicy, PolicyFailure, Sandbox};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
pub use weightgrad_sdk::golden_input;
use weightgrad_sdk::{LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TensorPlan};

/// What a round does when the active policy fails (Envoy's vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailStrategy {
    /// Ask the previous (last good) policy; fail closed if there is none or it fails too.
    #[default]
    LastGood,
    /// Hold every update in the residuals this round.
    Closed,
    /// Send everything at full precision this round.
    Open,
}

/// Which decision a round used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionSource {
    /// The active policy.
    Active,
    /// The previous policy, after the active one failed.
    Previous,
    /// Everything held (fail closed).
    HeldAll,
    /// Everything sent in fp32 (fail open).
    SentAll,
}

/// A round's decision and how it was reached.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The plans.
    pub output: PolicyOutput,
    /// Where they came from.
    pub source: DecisionSource,
    /// The active policy's failure, if it failed.
    pub failure: Option<PolicyFailure>,
}

/// Outcome of a successful swap.
#[derive(Debug, Clone, Serialize)]
pub struct SwapReport {
    /// The new active policy.
    pub active: PolicyInfo,
    /// Its digest.
    pub digest: String,
    /// The policy it replaced (now the rollback target).
    pub previous_digest: String,
}

struct State {
    active: Arc<CompiledPolicy>,
    previous: Option<Arc<CompiledPolicy>>,
    failures: BTreeMap<&'static str, u64>,
    swaps: u64,
}

/// The policy an agent runs, with fallback and hot swap.
pub struct PolicyRuntime {
    sandbox: Arc<Sandbox>,
    strategy: FailStrategy,
    state: Mutex<State>,
}

fn everywhere(input: &PolicyInput, plan: TensorPlan) -> PolicyOutput {
    PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION)
}

impl PolicyRuntime {
    /// Loads and self-tests `bytes` as the first active policy.
    pub fn new(
        sandbox: Arc<Sandbox>,
        bytes: &[u8],
        strategy: FailStrategy,
    ) -> Result<Self, PolicyFailure> {
        let policy = Self::admit(&sandbox, bytes)?;
        Ok(Self {
            sandbox,
            strategy,
            state: Mutex::new(State {
                active: Arc::new(policy),
                previous: None,
                failures: BTreeMap::new(),
                swaps: 0,
            }),
        })
    }

    /// Compiles and self-tests a candidate without touching the running policy.
    pub fn admit(sandbox: &Sandbox, bytes: &[u8]) -> Result<CompiledPolicy, PolicyFailure> {
        let policy = sandbox.load(bytes)?;
        // Behaviour, not speed: a generous budget (an endless loop still fails).
        sandbox.decide_within(&policy, &golden_input(), sandbox.admission_budget())?;
        Ok(policy)
    }

    /// The active policy.
    pub fn active(&self) -> Arc<CompiledPolicy> {
        self.state.lock().expect("policy state").active.clone()
    }

    /// The rollback target, if any.
    pub fn previous(&self) -> Option<Arc<CompiledPolicy>> {
        self.state.lock().expect("policy state").previous.clone()
    }

    /// Failures so far, by kind.
    pub fn failures(&self) -> BTreeMap<&'static str, u64> {
        self.state.lock().expect("policy state").failures.clone()
    }

    /// Successful swaps and rollbacks so far.
    pub fn swaps(&self) -> u64 {
        self.state.lock().expect("policy state").swaps
    }

    /// Replaces the active policy with `bytes` after checking it; the old one becomes the
    /// rollback target. On error nothing changes.
    pub fn swap(&self, bytes: &[u8]) -> Result<SwapReport, PolicyFailure> {
        self.swap_checked(bytes, |_| Ok(()))
    }

    /// Like [`Self::swap`], and also refuses a candidate `check` rejects (for instance one
    /// that would change the run's merge mode).
    pub fn swap_checked(
        &self,
        bytes: &[u8],
        check: impl FnOnce(&CompiledPolicy) -> Result<(), String>,
    ) -> Result<SwapReport, PolicyFailure> {
        let candidate = Arc::new(Self::admit(&self.sandbox, bytes)?);
        check(&candidate).map_err(PolicyFailure::Incompatible)?;
        let mut st = self.state.lock().expect("policy state");
        let old = std::mem::replace(&mut st.active, candidate.clone());
        let report = SwapReport {
            active: candidate.info.clone(),
            digest: candidate.digest.clone(),
            previous_digest: old.digest.clone(),
        };
        st.previous = Some(old);
        st.swaps += 1;
        Ok(report)
    }

    /// Swaps the active policy and the rollback target back.
    pub fn rollback(&self) -> Result<SwapReport, String> {
        let mut st = self.state.lock().expect("policy state");
        let Some(prev) = st.previous.take() else {
            return Err("no previous policy to roll back to".into());
        };
        let old = std::mem::replace(&mut st.active, prev.clone());
        st.previous = Some(old.clone());
        st.swaps += 1;
        Ok(SwapReport {
            active: prev.info.clone(),
            digest: prev.digest.clone(),
            previous_digest: old.digest.clone(),
        })
    }

    /// Decides a round, falling back per the strategy if the active policy fails.
    pub fn decide_round(&self, input: &PolicyInput) -> Decision {
        let (active, previous) = {
            let st = self.state.lock().expect("policy state");
            (st.active.clone(), st.previous.clone())
        };
        let failure = match self.sandbox.decide(&active, input) {
            Ok(output) => {
                return Decision {
                    output,
                    source: DecisionSource::Active,
                    failure: None,
                };
            }
            Err(f) => f,
        };
        *self
            .state
            .lock()
            .expect("policy state")
            .failures
            .entry(failure.kind())
            .or_default() += 1;
        tracing::warn!(digest = %active.digest, policy = %active.info.name, kind = failure.kind(), "policy call failed: {failure}");
        let hold = || everywhere(input, TensorPlan::HOLD);
        let (output, source) = match self.strategy {
            FailStrategy::Closed => (hold(), DecisionSource::HeldAll),
            FailStrategy::Open => (
                everywhere(
                    input,
                    TensorPlan {
                        send: true,
                        tau: 0.0,
                        bits: 32,
                        top_fraction: 1.0,
                    },
                ),
                DecisionSource::SentAll,
            ),
            FailStrategy::LastGood => match previous.map(|p| self.sandbox.decide(&p, input)) {
                Some(Ok(out)) => (out, DecisionSource::Previous),
                _ => (hold(), DecisionSource::HeldAll),
            },
        };
        Decision {
            output,
            source,
            failure: Some(failure),
        }
    }
}

impl Policy for PolicyRuntime {
    fn info(&self) -> PolicyInfo {
        self.active().info.clone()
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        self.decide_round(input).output
    }
}
