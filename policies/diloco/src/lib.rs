//! `diloco`: regions train alone for `every` rounds, then send their whole accumulated update
//! (the pseudo-gradient) as int8; the agent's `mean` merge averages them and takes an outer
//! Nesterov step. Run it with `MergeMode::Mean { every: DEFAULT_EVERY, .. }`.

use weightgrad_sdk::{LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TensorPlan};

/// Rounds between synchronisations by default.
pub const DEFAULT_EVERY: u64 = 8;

/// DiLoCo's communication pattern.
#[derive(Debug, Clone, Copy)]
pub struct DiLoCo {
    /// Rounds between synchronisations (must match the merge's).
    pub every: u64,
}

impl Default for DiLoCo {
    fn default() -> Self {
        Self {
            every: DEFAULT_EVERY,
        }
    }
}

impl Policy for DiLoCo {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "diloco".into(),
            version: "1.0.0".into(),
            description: "int8 pseudo-gradients every 8 rounds, mean merge with outer Nesterov"
                .into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let plan = TensorPlan {
            send: input.context.round.is_multiple_of(self.every.max(1)),
            tau: 0.0,
            bits: 8,
            top_fraction: 1.0,
        };
        PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION)
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(DiLoCo);
