//! `gaia`: Gaia's approximate synchronous parallel. An accumulated update crosses a link
//! once `|A_i / w_i| > τ`, with `τ = τ0 · lr / base_lr` (τ0 = 1%); values travel in fp32.

use weightgrad_sdk::{
    LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TauSchedule, TensorPlan,
};

/// Gaia's significance filter with full-precision values.
#[derive(Debug, Clone, Copy)]
pub struct Gaia {
    /// Threshold at the start of the run.
    pub tau0: f32,
    /// How the threshold decays.
    pub tau_schedule: TauSchedule,
}

impl Default for Gaia {
    fn default() -> Self {
        Self {
            tau0: 0.01,
            tau_schedule: TauSchedule::LearningRate,
        }
    }
}

impl Policy for Gaia {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "gaia".into(),
            version: "1.0.0".into(),
            description:
                "significance filter (tau0 1%, decaying with the learning rate), fp32 values".into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let plan = TensorPlan {
            send: true,
            tau: self.tau_schedule.tau(self.tau0, &input.context),
            bits: 32,
            top_fraction: 1.0,
        };
        PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION)
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(Gaia);
