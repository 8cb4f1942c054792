//! `full-sync`: every non-zero update crosses every link every round in fp32, and workers
//! send fp32 gradients. The baseline every other policy is measured against.

use weightgrad_sdk::{LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TensorPlan};

/// The full-synchronisation baseline.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullSync;

impl Policy for FullSync {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "full-sync".into(),
            version: "1.0.0".into(),
            description: "every update, every round, fp32 (the baseline)".into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let send = TensorPlan {
            send: true,
            tau: 0.0,
            bits: 32,
            top_fraction: 1.0,
        };
        PolicyOutput::uniform(input, send, LanPlan::FULL_PRECISION)
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(FullSync);
