//! `topk`: every round, the `fraction` largest-magnitude elements of each tensor's
//! accumulated update cross each link at 8 bits; everything else stays in the residual
//! (error feedback), so small updates cross once they have accumulated.

use weightgrad_sdk::{LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TensorPlan};

/// Top-k sparsification with error feedback.
#[derive(Debug, Clone, Copy)]
pub struct TopK {
    /// Fraction of each tensor sent per round, in (0, 1].
    pub fraction: f32,
}

impl Default for TopK {
    fn default() -> Self {
        Self { fraction: 0.01 }
    }
}

impl Policy for TopK {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "topk".into(),
            version: "1.0.0".into(),
            description: "largest 1% of each tensor's update every round, 8 bits, error feedback"
                .into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let plan = TensorPlan {
            send: true,
            tau: 0.0,
            bits: 8,
            top_fraction: if input.context.final_round {
                1.0
            } else {
                self.fraction
            },
        };
        PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION)
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(TopK);
