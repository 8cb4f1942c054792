//! `terngrad`: TernGrad. Workers send scaled ternary gradients (2 bits, 2.5σ clipping) to
//! their aggregator; between regions every update crosses every round at 2 bits
//! (stochastic, unbiased; error feedback keeps the rest).

use weightgrad_sdk::{LanMode, LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TensorPlan};

/// The TernGrad scheme.
#[derive(Debug, Clone, Copy, Default)]
pub struct TernGrad;

impl Policy for TernGrad {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "terngrad".into(),
            version: "1.0.0".into(),
            description: "ternary LAN gradients, 2-bit WAN updates every round".into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let tensors = input.links.first().map_or(0, |l| l.tensors.len());
        let plan = TensorPlan {
            send: true,
            tau: 0.0,
            bits: 2,
            top_fraction: 1.0,
        };
        let lan = LanPlan {
            gradient_bits: vec![2; tensors],
            weight_bits: 32,
            mode: LanMode::Gradient,
        };
        PolicyOutput::uniform(input, plan, lan)
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(TernGrad);
