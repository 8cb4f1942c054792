//! The active policy, its rollback target, the failure strategy, the breaker and hot swap.
//!
//! A swap verifies the component (size, digest, contract, quarantine), compiles it, runs a
//! self-test on a golden input, and only then replaces the active policy between rounds;
//! the old one stays as the rollback target. A failing call never stops the agent: the
//! configured strategy decides what the round does instead, and the failure is counted by
//! kind. After `rollback_after` failed calls in a row the breaker trips: the agent rolls
//! back to the previous policy by itself (as `POST /policies/rollback` would) and
//! quarantines the failed component, so a later push of it is refused unless forced. With
//! no previous policy the failing one stays active but is only retried at growing
//! intervals, the strategy deciding the rounds in between.

use crate::policy::failure_log::{FailureLine, FailureLog, short_reason};
use crate::policy::host::{CompiledPolicy, PolicyFailure, Sandbox};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
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
    /// The plans. With a fallback, its state blob is the active policy's, unchanged.
    pub output: PolicyOutput,
    /// Where they came from.
    pub source: DecisionSource,
    /// The active policy's failure, if it was called and failed.
    pub failure: Option<PolicyFailure>,
    /// The breaker rolled the failing policy back after this round's call.
    pub rolled_back: Option<SwapReport>,
}

/// Outcome of a successful swap.
#[derive(Debug, Clone, Serialize)]
pub struct SwapReport {
    /// The new active policy.
    pub active: PolicyInfo,
    /// Its digest.
    pub digest: String,
    /// The policy it replaced (now the rollback target, unless the breaker replaced it).
    pub previous_digest: String,
}

/// When the agent rolls a failing policy back on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    /// Failed calls in a row that trip it; 0: never.
    pub rollback_after: u32,
}

impl Default for Breaker {
    fn default() -> Self {
        Self { rollback_after: 3 }
    }
}

/// A component the breaker rolled back: refused on push unless forced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quarantined {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// sha256 of the component.
    pub digest: String,
    /// The last failure's kind.
    pub kind: &'static str,
    /// The last failure's reason.
    pub reason: String,
    /// Failed calls in a row when it was rolled back.
    pub failures: u32,
    /// The round of the first of those failures.
    pub first_failure_round: u64,
    /// The round after whose call it was rolled back.
    pub rolled_back_round: u64,
    /// The policy rolled back to.
    pub replaced_by: String,
}

/// The breaker tripped with no policy to roll back to: the active one is only retried at
/// `next_probe`, the failure strategy deciding until then.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suspended {
    /// The round it tripped at.
    pub since_round: u64,
    /// The next round the policy is called again.
    pub next_probe: u64,
    /// Rounds between probes (doubling to [`MAX_PROBE_INTERVAL`]).
    pub interval: u64,
    /// The last failure's kind.
    pub kind: &'static str,
    /// The last failure's reason.
    pub reason: String,
}

/// The longest wait between two calls of a suspended policy, in rounds.
pub const MAX_PROBE_INTERVAL: u64 = 64;

/// The breaker's view of the active policy, for `/policies` and `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct BreakerStatus {
    /// Failed calls in a row that trip the breaker (0: never).
    pub rollback_after: u32,
    /// The active policy's failed calls in a row so far.
    pub consecutive_failures: u32,
    /// Set while the breaker is open with nothing to roll back to.
    pub suspended: Option<Suspended>,
    /// Components rolled back by the breaker, most recent last.
    pub quarantined: Vec<Quarantined>,
    /// Rollbacks the breaker made.
    pub rollbacks: u64,
}

struct State {
    active: Arc<CompiledPolicy>,
    previous: Option<Arc<CompiledPolicy>>,
    failures: BTreeMap<&'static str, u64>,
    swaps: u64,
    consecutive: u32,
    first_failure_round: u64,
    suspended: Option<Suspended>,
    quarantine: Vec<Quarantined>,
    rollbacks: u64,
    log: FailureLog,
}

impl State {
    /// A new active policy: the breaker starts over.
    fn activated(&mut self) {
        self.consecutive = 0;
        self.suspended = None;
    }
}

/// The policy an agent runs, with fallback, a breaker and hot swap.
pub struct PolicyRuntime {
    sandbox: Arc<Sandbox>,
    strategy: FailStrategy,
    breaker: Breaker,
    state: Mutex<State>,
}

fn everywhere(input: &PolicyInput, plan: TensorPlan) -> PolicyOutput {
    PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION)
}

impl PolicyRuntime {
    /// Loads and self-tests `bytes` as the first active policy; the breaker trips after
    /// three failed calls in a row.
    pub fn new(
        sandbox: Arc<Sandbox>,
        bytes: &[u8],
        strategy: FailStrategy,
    ) -> Result<Self, PolicyFailure> {
        Self::with_breaker(sandbox, bytes, strategy, Breaker::default())
    }

    /// [`Self::new`] with the breaker's setting.
    pub fn with_breaker(
        sandbox: Arc<Sandbox>,
        bytes: &[u8],
        strategy: FailStrategy,
        breaker: Breaker,
    ) -> Result<Self, PolicyFailure> {
        let policy = Self::admit(&sandbox, bytes)?;
        Ok(Self {
            sandbox,
            strategy,
            breaker,
            state: Mutex::new(State {
                active: Arc::new(policy),
                previous: None,
                failures: BTreeMap::new(),
                swaps: 0,
                consecutive: 0,
                first_failure_round: 0,
                suspended: None,
                quarantine: Vec::new(),
                rollbacks: 0,
                log: FailureLog::default(),
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("policy state")
    }

    /// The active policy.
    pub fn active(&self) -> Arc<CompiledPolicy> {
        self.lock().active.clone()
    }

    /// The rollback target, if any.
    pub fn previous(&self) -> Option<Arc<CompiledPolicy>> {
        self.lock().previous.clone()
    }

    /// Failures so far, by kind.
    pub fn failures(&self) -> BTreeMap<&'static str, u64> {
        self.lock().failures.clone()
    }

    /// Successful swaps and rollbacks so far (the breaker's included).
    pub fn swaps(&self) -> u64 {
        self.lock().swaps
    }

    /// The breaker's state and the quarantine.
    pub fn breaker(&self) -> BreakerStatus {
        let st = self.lock();
        BreakerStatus {
            rollback_after: self.breaker.rollback_after,
            consecutive_failures: st.consecutive,
            suspended: st.suspended.clone(),
            quarantined: st.quarantine.clone(),
            rollbacks: st.rollbacks,
        }
    }

    /// Replaces the active policy with `bytes` after checking it; the old one becomes the
    /// rollback target. On error nothing changes.
    pub fn swap(&self, bytes: &[u8]) -> Result<SwapReport, PolicyFailure> {
        self.swap_checked(bytes, false, |_| Ok(()))
    }

    /// Like [`Self::swap`], and also refuses a candidate `check` rejects (for instance one
    /// that would change the run's merge mode), and a quarantined one unless `force`
    /// (which lifts its quarantine).
    pub fn swap_checked(
        &self,
        bytes: &[u8],
        force: bool,
        check: impl FnOnce(&CompiledPolicy) -> Result<(), String>,
    ) -> Result<SwapReport, PolicyFailure> {
        let digest = hex::encode(Sha256::digest(bytes));
        if !force && let Some(q) = self.lock().quarantine.iter().find(|q| q.digest == digest) {
            return Err(PolicyFailure::Quarantined(format!(
                "{} {} was rolled back at round {} after {} failed calls in a row ({}: {}); \
                 push it with force to run it again",
                q.name, q.version, q.rolled_back_round, q.failures, q.kind, q.reason
            )));
        }
        let candidate = Arc::new(Self::admit(&self.sandbox, bytes)?);
        check(&candidate).map_err(PolicyFailure::Incompatible)?;
        let mut st = self.lock();
        st.quarantine.retain(|q| q.digest != candidate.digest);
        let old = std::mem::replace(&mut st.active, candidate.clone());
        let report = SwapReport {
            active: candidate.info.clone(),
            digest: candidate.digest.clone(),
            previous_digest: old.digest.clone(),
        };
        st.previous = Some(old);
        st.swaps += 1;
        st.activated();
        Ok(report)
    }

    /// Swaps the active policy and the rollback target back.
    pub fn rollback(&self) -> Result<SwapReport, String> {
        let mut st = self.lock();
        let Some(prev) = st.previous.take() else {
            return Err("no previous policy to roll back to".into());
        };
        let old = std::mem::replace(&mut st.active, prev.clone());
        st.previous = Some(old.clone());
        st.swaps += 1;
        st.activated();
        Ok(SwapReport {
            active: prev.info.clone(),
            digest: prev.digest.clone(),
            previous_digest: old.digest.clone(),
        })
    }

    /// Decides a round, falling back per the strategy if the active policy fails (or is
    /// suspended), and trips the breaker after enough failures in a row.
    pub fn decide_round(&self, input: &PolicyInput) -> Decision {
        let round = input.context.round;
        let (active, previous, suspended) = {
            let st = self.lock();
            let suspended = st.suspended.as_ref().is_some_and(|s| round < s.next_probe);
            (st.active.clone(), st.previous.clone(), suspended)
        };
        if suspended {
            return self.fall_back(input, previous.as_deref(), None);
        }
        let failure = match self.sandbox.decide(&active, input) {
            Ok(output) => {
                let mut st = self.lock();
                if let Some(s) = st.suspended.take() {
                    tracing::info!(policy = %active.info.name, digest = %active.digest, round, since = s.since_round, "the suspended policy decided again: the breaker closes");
                }
                st.consecutive = 0;
                return Decision {
                    output,
                    source: DecisionSource::Active,
                    failure: None,
                    rolled_back: None,
                };
            }
            Err(f) => f,
        };
        let rolled_back = self.count_failure(&active, &failure, round);
        let mut decision = self.fall_back(input, previous.as_deref(), Some(failure));
        decision.rolled_back = rolled_back;
        decision
    }

    /// Counts and logs a failed call of `active`; trips the breaker when due.
    fn count_failure(
        &self,
        active: &Arc<CompiledPolicy>,
        failure: &PolicyFailure,
        round: u64,
    ) -> Option<SwapReport> {
        let now = Instant::now();
        let mut st = self.lock();
        *st.failures.entry(failure.kind()).or_default() += 1;
        if st.consecutive == 0 {
            st.first_failure_round = round;
        }
        st.consecutive += 1;
        let reason = short_reason(&failure.to_string());
        let name = &active.info.name;
        match st.log.record(&active.digest, failure.kind(), &reason, now) {
            Some(FailureLine::First { kind, reason }) => {
                tracing::warn!(digest = %active.digest, policy = %name, kind, round, "policy call failed: {reason}");
            }
            Some(FailureLine::Repeated { counts, over }) => {
                tracing::warn!(digest = %active.digest, policy = %name, "policy calls keep failing: {} in the last {:.0} s", summary(&counts), over.as_secs_f64());
            }
            None => {}
        }
        tracing::debug!(digest = %active.digest, policy = %name, kind = failure.kind(), round, "policy call failed: {failure}");
        let due = self.breaker.rollback_after > 0 && st.consecutive >= self.breaker.rollback_after;
        if !due || st.suspended.is_some() && st.previous.is_none() {
            if let Some(s) = st.suspended.as_mut() {
                // A failed probe: wait twice as long for the next.
                s.interval = (s.interval * 2).min(MAX_PROBE_INTERVAL);
                s.next_probe = round + s.interval;
                s.kind = failure.kind();
                s.reason = reason;
            }
            return None;
        }
        if let Some(FailureLine::Repeated { counts, over }) = st.log.flush(now) {
            tracing::warn!(digest = %active.digest, policy = %name, "policy calls kept failing: {} in the last {:.0} s", summary(&counts), over.as_secs_f64());
        }
        let Some(previous) = st.previous.take() else {
            tracing::error!(digest = %active.digest, policy = %name, failures = st.consecutive, round, "policy failed {} calls in a row and there is no previous policy: it is called again only every few rounds, the failure strategy deciding meanwhile; push a policy to replace it", st.consecutive);
            st.suspended = Some(Suspended {
                since_round: round,
                next_probe: round + 1,
                interval: 1,
                kind: failure.kind(),
                reason,
            });
            return None;
        };
        let quarantined = Quarantined {
            name: name.clone(),
            version: active.info.version.clone(),
            digest: active.digest.clone(),
            kind: failure.kind(),
            reason,
            failures: st.consecutive,
            first_failure_round: st.first_failure_round,
            rolled_back_round: round,
            replaced_by: previous.digest.clone(),
        };
        tracing::warn!(digest = %active.digest, policy = %name, failures = st.consecutive, round, back_to = %previous.info.name, back_to_digest = %previous.digest, "policy failed {} calls in a row ({}: {}): rolled back and quarantined", st.consecutive, quarantined.kind, quarantined.reason);
        st.quarantine.retain(|q| q.digest != active.digest);
        st.quarantine.push(quarantined);
        st.active = previous.clone();
        st.swaps += 1;
        st.rollbacks += 1;
        st.activated();
        Some(SwapReport {
            active: previous.info.clone(),
            digest: previous.digest.clone(),
            previous_digest: active.digest.clone(),
        })
    }

    /// What the strategy decides when the active policy failed or is suspended. The
    /// previous policy decides on an empty state of its own; the active policy's state
    /// blob is kept as it was (its last good one: a call that fails on it fails again,
    /// and the breaker sees failures in a row).
    fn fall_back(
        &self,
        input: &PolicyInput,
        previous: Option<&CompiledPolicy>,
        failure: Option<PolicyFailure>,
    ) -> Decision {
        let hold = || everywhere(input, TensorPlan::HOLD);
        let (mut output, source) = match self.strategy {
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
            FailStrategy::LastGood => {
                let stateless = PolicyInput {
                    state: Vec::new(),
                    ..input.clone()
                };
                match previous.map(|p| self.sandbox.decide(p, &stateless)) {
                    Some(Ok(out)) => (out, DecisionSource::Previous),
                    _ => (hold(), DecisionSource::HeldAll),
                }
            }
        };
        output.state = input.state.clone();
        Decision {
            output,
            source,
            failure,
            rolled_back: None,
        }
    }
}

/// `3 timeout, 1 trap`.
fn summary(counts: &BTreeMap<&'static str, u64>) -> String {
    counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Policy for PolicyRuntime {
    fn info(&self) -> PolicyInfo {
        self.active().info.clone()
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        self.decide_round(input).output
    }
}
