//! `weightgrad`: the WeightGrad scheme. Between regions, every `sync_every` rounds, Gaia's
//! significance filter (`τ = τ0 · lr / base_lr`) with the survivors quantized to a few bits
//! (weights at `weight_bits`, biases at `bias_bits`; error feedback keeps what quantization
//! loses). Inside a region, workers train on loss-aware quantized weights and send
//! quantized gradients for weight tensors.
//!
//! On the final round it flushes every residual element at 8 bits, so nothing is left
//! behind when the run ends.
//!
//! Defaults (τ0 5%, every 4 rounds, 2-bit weights, 8-bit biases, 8-bit LAN gradients and
//! weights) were chosen on the embedded digits demo; `docs/benchmarks.md` records the runs.
//! Two findings from that tuning: 1-bit stochastic WAN values diverge with error feedback
//! (the residual feeds the bucket's scale back into itself), and TernGrad LAN gradients
//! cost about one point of top-1 on this model.

use weightgrad_sdk::{
    LanMode, LanPlan, LinkPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TauSchedule,
    TensorPlan, TensorRole,
};

/// The WeightGrad policy and its knobs.
#[derive(Debug, Clone, Copy)]
pub struct WeightGrad {
    /// Threshold at the start of the run.
    pub tau0: f32,
    /// How the threshold decays.
    pub tau_schedule: TauSchedule,
    /// WAN bits for weight tensors.
    pub weight_bits: u8,
    /// WAN bits for bias tensors.
    pub bias_bits: u8,
    /// LAN gradient bits for weight tensors (biases stay fp32).
    pub lan_gradient_bits: u8,
    /// Bits of the loss-aware quantized weights workers train on.
    pub lan_weight_bits: u8,
    /// Send every this many rounds (1: every round); in between, updates accumulate in
    /// the residuals, where opposite-signed steps cancel before they cost bytes.
    pub sync_every: u32,
}

impl Default for WeightGrad {
    fn default() -> Self {
        Self {
            tau0: 0.05,
            tau_schedule: TauSchedule::LearningRate,
            weight_bits: 2,
            bias_bits: 8,
            lan_gradient_bits: 8,
            lan_weight_bits: 8,
            sync_every: 4,
        }
    }
}

impl Policy for WeightGrad {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "weightgrad".into(),
            version: "1.0.0".into(),
            description: "significance filter every 4 rounds, 2-bit WAN updates, 8-bit LAN gradients and weights"
                .into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let tau = self.tau_schedule.tau(self.tau0, &input.context);
        let roles: Vec<TensorRole> = input
            .links
            .first()
            .map(|l| l.tensors.iter().map(|t| t.role).collect())
            .unwrap_or_default();
        let send = input
            .context
            .round
            .is_multiple_of(u64::from(self.sync_every.max(1)));
        let plan_for = |role: TensorRole| {
            if input.context.final_round {
                // Leave nothing behind: every residual element, at 8 bits.
                return TensorPlan {
                    send: true,
                    tau: 0.0,
                    bits: 8,
                    top_fraction: 1.0,
                };
            }
            TensorPlan {
                send,
                tau,
                bits: match role {
                    TensorRole::Weight => self.weight_bits,
                    TensorRole::Bias => self.bias_bits,
                },
                top_fraction: 1.0,
            }
        };
        PolicyOutput {
            links: input
                .links
                .iter()
                .map(|l| LinkPlan {
                    tensors: l.tensors.iter().map(|t| plan_for(t.role)).collect(),
                })
                .collect(),
            lan: LanPlan {
                gradient_bits: roles
                    .iter()
                    .map(|r| match r {
                        TensorRole::Weight => self.lan_gradient_bits,
                        TensorRole::Bias => 32,
                    })
                    .collect(),
                weight_bits: self.lan_weight_bits,
                mode: LanMode::Gradient,
            },
            state: input.state.clone(),
        }
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(WeightGrad);
