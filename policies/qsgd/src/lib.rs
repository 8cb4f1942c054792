//! `qsgd`: QSGD. Unbiased stochastic `bits`-bit quantization with a scale per bucket, for
//! worker gradients on the LAN and for every update on the WAN, every round.

use weightgrad_sdk::{LanMode, LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TensorPlan};

/// The QSGD scheme.
#[derive(Debug, Clone, Copy)]
pub struct Qsgd {
    /// Bits per value, 1..=8.
    pub bits: u8,
}

impl Default for Qsgd {
    fn default() -> Self {
        Self { bits: 4 }
    }
}

impl Policy for Qsgd {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "qsgd".into(),
            version: "1.0.0".into(),
            description: "4-bit stochastic LAN gradients and WAN updates every round".into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let tensors = input.links.first().map_or(0, |l| l.tensors.len());
        let plan = TensorPlan {
            send: true,
            tau: 0.0,
            bits: self.bits,
            top_fraction: 1.0,
        };
        let lan = LanPlan {
            gradient_bits: vec![self.bits; tensors],
            weight_bits: 32,
            mode: LanMode::Gradient,
        };
        PolicyOutput::uniform(input, plan, lan)
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(Qsgd);
