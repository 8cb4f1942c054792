//! The sandbox: a wasmtime engine with epoch interruption, per-call memory limits, a
//! compile cache keyed by sha256, and calls whose every output is validated.

use crate::policy::bindings::{Guest, info_from_wit, input_to_wit, output_from_wit};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use weightgrad_sdk::{PolicyInfo, PolicyInput, PolicyOutput, validate_output};

/// Resource limits for policy calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Largest linear memory a guest may grow to.
    pub memory_bytes: usize,
    /// Wall-clock budget of one call.
    pub deadline: Duration,
    /// Largest component accepted.
    pub max_component_bytes: usize,
    /// Largest state blob a policy may return.
    pub max_state_bytes: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 16 << 20,
            deadline: Duration::from_millis(10),
            max_component_bytes: 8 << 20,
            max_state_bytes: 1 << 20,
        }
    }
}

/// How often the engine's epoch advances; the deadline is counted in these ticks.
const TICK: Duration = Duration::from_millis(1);

/// Why a policy call (or a policy) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyFailure {
    /// The bytes are not a component, or it does not export the contract.
    #[error("not a valid {contract} component: {0}", contract = weightgrad_sdk::CONTRACT)]
    Load(String),
    /// The call ran past its deadline and was interrupted.
    #[error("ran past its {0:?} deadline and was stopped")]
    Timeout(Duration),
    /// The guest tried to grow memory past the cap, or was still growing it towards the
    /// cap when its deadline stopped it.
    #[error("{0}")]
    Memory(String),
    /// The guest trapped (a panic, an unreachable, a bad access).
    #[error("trapped: {0}")]
    Trap(String),
    /// The guest returned an error of its own.
    #[error("refused to decide: {0}")]
    Refused(String),
    /// The guest returned a plan that breaks the contract.
    #[error("returned an invalid plan: {0}")]
    Invalid(String),
    /// The guest's output exceeds a size limit.
    #[error("returned an oversized output: {0}")]
    Oversized(String),
    /// A valid policy that does not fit the running agent.
    #[error("does not fit this agent: {0}")]
    Incompatible(String),
    /// The agent rolled this component back after it failed, and a push must be forced.
    #[error("is quarantined: {0}")]
    Quarantined(String),
}

impl PolicyFailure {
    /// The kinds a round's decision can fail with (loading and fitting fail only a swap).
    pub const DECISION_KINDS: [&'static str; 6] = [
        "timeout",
        "memory",
        "trap",
        "refused",
        "invalid",
        "oversized",
    ];

    /// A short, bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Load(_) => "load",
            Self::Timeout(_) => "timeout",
            Self::Memory(_) => "memory",
            Self::Trap(_) => "trap",
            Self::Refused(_) => "refused",
            Self::Invalid(_) => "invalid",
            Self::Oversized(_) => "oversized",
            Self::Incompatible(_) => "incompatible",
            Self::Quarantined(_) => "quarantined",
        }
    }
}

/// A compiled policy: its digest, its self-description and the component.
#[derive(Clone)]
pub struct CompiledPolicy {
    /// Hex sha256 of the component bytes.
    pub digest: String,
    /// What the policy says it is.
    pub info: PolicyInfo,
    component: Component,
}

impl std::fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledPolicy")
            .field("digest", &self.digest)
            .field("info", &self.info)
            .finish()
    }
}

struct CallState {
    limits: PeakLimits,
}

/// The store's limits, remembering the largest linear memory the guest asked for.
struct PeakLimits {
    limits: StoreLimits,
    peak: usize,
}

impl wasmtime::ResourceLimiter for PeakLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.peak = self.peak.max(desired);
        self.limits.memory_growing(current, desired, maximum)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// Why a component's (or a core module's) exports are not the contract's, with what to
/// do about it.
pub fn export_mismatch(exports: &[String]) -> String {
    let package = weightgrad_sdk::EXPORT
        .split_once('@')
        .map_or(weightgrad_sdk::EXPORT, |(p, _)| p);
    let found = if exports.is_empty() {
        "nothing".to_string()
    } else {
        exports.join(", ")
    };
    let other_version = exports
        .iter()
        .find_map(|name| name.strip_prefix(package)?.strip_prefix('@'));
    match other_version {
        Some(version) => format!(
            "it exports {found}, not {}: it was built against the SDK of contract \
             version {version}; rebuild it against this agent's SDK (`weightgrad policy new` \
             writes that SDK beside a new crate)",
            weightgrad_sdk::EXPORT
        ),
        None => format!(
            "it exports {found}, not {} (a policy crate exports it with \
             `weightgrad_sdk::export_policy!`)",
            weightgrad_sdk::EXPORT
        ),
    }
}

/// The engine shared by every policy of an agent.
pub struct Sandbox {
    engine: Engine,
    limits: SandboxLimits,
    cache: Mutex<HashMap<String, Component>>,
    _ticker: Arc<()>,
}

impl Sandbox {
    /// A sandbox with `limits`; starts the thread that advances the epoch.
    pub fn new(limits: SandboxLimits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("policy engine: {e:#}"))?;
        let alive = Arc::new(());
        let weak_alive = Arc::downgrade(&alive);
        let weak_engine = engine.weak();
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                while weak_alive.strong_count() > 0 {
                    std::thread::sleep(TICK);
                    match weak_engine.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(Self {
            engine,
            limits,
            cache: Mutex::new(HashMap::new()),
            _ticker: alive,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> SandboxLimits {
        self.limits
    }

    /// Compiles (or fetches from the cache) a component and asks it who it is.
    pub fn load(&self, bytes: &[u8]) -> Result<CompiledPolicy, PolicyFailure> {
        if bytes.len() > self.limits.max_component_bytes {
            return Err(PolicyFailure::Load(format!(
                "{} bytes exceeds the {}-byte limit",
                bytes.len(),
                self.limits.max_component_bytes
            )));
        }
        let digest = hex::encode(Sha256::digest(bytes));
        let cached = self.cache.lock().expect("cache lock").get(&digest).cloned();
        let component = match cached {
            Some(c) => c,
            None => {
                let c = Component::new(&self.engine, bytes)
                    .map_err(|e| PolicyFailure::Load(one_line(&e)))?;
                self.check_exports(&c)?;
                self.cache
                    .lock()
                    .expect("cache lock")
                    .insert(digest.clone(), c.clone());
                c
            }
        };
        let mut policy = CompiledPolicy {
            digest,
            info: PolicyInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
            },
            component,
        };
        policy.info = self.call_within(&policy, self.admission_budget(), |store, guest| {
            guest
                .weightgrad_policy_policy()
                .call_info(store)
                .map(info_from_wit)
        })?;
        Ok(policy)
    }

    /// Refuses a component that does not export the contract's interface, naming what it
    /// exports instead (a policy built against another SDK exports another version).
    fn check_exports(&self, component: &Component) -> Result<(), PolicyFailure> {
        let exports: Vec<String> = component
            .component_type()
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        if exports.iter().any(|name| name == weightgrad_sdk::EXPORT) {
            return Ok(());
        }
        Err(PolicyFailure::Load(export_mismatch(&exports)))
    }

    /// The wall-clock budget of admission calls (`info`, the self-test and the sample
    /// round `policy check` prints): behaviour is checked there, not speed, so a loaded
    /// host does not refuse a good policy; an endless loop still fails.
    pub fn admission_budget(&self) -> Duration {
        (self.limits.deadline * 100).max(Duration::from_secs(1))
    }

    /// Runs one round's decision, validating the output against the input.
    pub fn decide(
        &self,
        policy: &CompiledPolicy,
        input: &PolicyInput,
    ) -> Result<PolicyOutput, PolicyFailure> {
        self.decide_within(policy, input, self.limits.deadline)
    }

    /// Like [`Self::decide`] with its own wall-clock budget. Admission self-tests use a
    /// generous one: they check behaviour, and a busy host must not refuse a good policy
    /// because a 10 ms budget was spent waiting for a core.
    pub fn decide_within(
        &self,
        policy: &CompiledPolicy,
        input: &PolicyInput,
        deadline: Duration,
    ) -> Result<PolicyOutput, PolicyFailure> {
        if input.state.len() > self.limits.max_state_bytes {
            return Err(PolicyFailure::Oversized(format!(
                "the state blob handed in is {} bytes, over the {}-byte limit",
                input.state.len(),
                self.limits.max_state_bytes
            )));
        }
        let input_bytes = input_size(input);
        if input_bytes > self.limits.memory_bytes / 2 {
            return Err(PolicyFailure::Oversized(format!(
                "the round's input is about {input_bytes} bytes, too large for the {}-byte sandbox",
                self.limits.memory_bytes
            )));
        }
        let wit_input = input_to_wit(input);
        let result = self
            .call_within(policy, deadline, |store, guest| {
                guest
                    .weightgrad_policy_policy()
                    .call_decide(store, &wit_input)
            })
            .map_err(|failure| self.name_growing_state(failure, input))?;
        let output = output_from_wit(result.map_err(PolicyFailure::Refused)?);
        if output.state.len() > self.limits.max_state_bytes {
            return Err(PolicyFailure::Oversized(format!(
                "state blob of {} bytes (limit {})",
                output.state.len(),
                self.limits.max_state_bytes
            )));
        }
        validate_output(input, &output).map_err(PolicyFailure::Invalid)?;
        Ok(output)
    }

    /// A call that ran out of time or memory, or trapped, while handed a state over half
    /// its limit was most likely growing it past the limit (a state that doubles every
    /// round fails this way before it is ever returned too large): say so.
    fn name_growing_state(&self, failure: PolicyFailure, input: &PolicyInput) -> PolicyFailure {
        let large = input.state.len() > self.limits.max_state_bytes / 2;
        match failure {
            PolicyFailure::Timeout(_) | PolicyFailure::Memory(_) | PolicyFailure::Trap(_)
                if large =>
            {
                PolicyFailure::Oversized(format!(
                    "handed a state blob of {} bytes (over half the {}-byte limit), it failed \
                     building the next one ({}: {failure})",
                    input.state.len(),
                    self.limits.max_state_bytes,
                    failure.kind()
                ))
            }
            other => other,
        }
    }

    /// Instantiates `policy` in a fresh, limited store and runs `f` on it within `deadline`.
    fn call_within<R>(
        &self,
        policy: &CompiledPolicy,
        deadline: Duration,
        f: impl FnOnce(&mut Store<CallState>, &Guest) -> wasmtime::Result<R>,
    ) -> Result<R, PolicyFailure> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .trap_on_grow_failure(true)
            .instances(16)
            .build();
        let mut store = Store::new(
            &self.engine,
            CallState {
                limits: PeakLimits { limits, peak: 0 },
            },
        );
        store.limiter(|s| &mut s.limits);
        let ticks = (deadline.as_millis() as u64).max(1);
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        let linker = Linker::new(&self.engine);
        let guest = Guest::instantiate(&mut store, &policy.component, &linker)
            .map_err(|e| PolicyFailure::Load(one_line(&e)))?;
        f(&mut store, &guest).map_err(|e| {
            let peak = store.data().limits.peak;
            self.classify(e, deadline, peak)
        })
    }

    /// What a failed call's error means; `peak` is the largest memory the guest asked for.
    fn classify(&self, e: wasmtime::Error, deadline: Duration, peak: usize) -> PolicyFailure {
        let cap = self.limits.memory_bytes;
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            // Stopped while its memory neared the cap: it was growing memory.
            if peak >= cap / 4 * 3 {
                return PolicyFailure::Memory(format!(
                    "grew its memory to {peak} bytes of its {cap}-byte cap until its \
                     {deadline:?} deadline stopped it"
                ));
            }
            return PolicyFailure::Timeout(deadline);
        }
        let text = format!("{e:#}");
        if text.contains("forcing trap when growing memory")
            || text.contains("memory growth failure")
        {
            return PolicyFailure::Memory(format!("exceeded its {cap}-byte memory cap"));
        }
        tracing::debug!(error = %text, "policy trap in full");
        // The causes without the wasm backtrace (which only the debug log gets).
        let reason = e
            .chain()
            .map(|cause| crate::policy::failure_log::short_reason(&cause.to_string()))
            .filter(|r| !r.is_empty() && r != "error while executing at")
            .collect::<Vec<_>>()
            .join(": ");
        PolicyFailure::Trap(if reason.is_empty() { text } else { reason })
    }
}

/// About how many bytes `input` takes in the guest's memory.
fn input_size(input: &PolicyInput) -> usize {
    let per_tensor = 64 + 4 * input.thresholds.len();
    let tensors: usize = input.links.iter().map(|l| l.tensors.len()).sum();
    input.state.len()
        + tensors * per_tensor
        + input
            .links
            .iter()
            .map(|l| 64 + l.link.peer.len())
            .sum::<usize>()
        + 8 * input.lan.tensor_sizes.len()
}

/// An error and its causes on one line, with runs of whitespace collapsed.
fn one_line(e: &wasmtime::Error) -> String {
    format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_mismatch_names_what_was_found_and_the_way_out() {
        let other = export_mismatch(&["weightgrad:policy/policy@1.0.0".into()]);
        assert!(
            other.contains(
                "exports weightgrad:policy/policy@1.0.0, not weightgrad:policy/policy@3.0.0"
            ) && other.contains("contract version 1.0.0")
                && other.contains("weightgrad policy new"),
            "{other}"
        );
        let none = export_mismatch(&[]);
        assert!(
            none.contains("exports nothing") && none.contains("export_policy!"),
            "{none}"
        );
    }

    #[test]
    fn decision_kinds_are_exactly_the_kinds_a_decision_can_fail_with() {
        let s = || String::from("x");
        let decision = [
            PolicyFailure::Timeout(Duration::from_millis(10)),
            PolicyFailure::Memory(s()),
            PolicyFailure::Trap(s()),
            PolicyFailure::Refused(s()),
            PolicyFailure::Invalid(s()),
            PolicyFailure::Oversized(s()),
        ];
        let kinds: Vec<&str> = decision.iter().map(PolicyFailure::kind).collect();
        assert_eq!(kinds, PolicyFailure::DECISION_KINDS);
        for swap_only in [
            PolicyFailure::Load(s()),
            PolicyFailure::Incompatible(s()),
            PolicyFailure::Quarantined(s()),
        ] {
            assert!(!PolicyFailure::DECISION_KINDS.contains(&swap_only.kind()));
        }
    }
}
