//! `adaptive`: keeps each link just under saturation. Per link it tracks a threshold τ in
//! its state blob: when bytes are still queued on the link from earlier rounds (the link is
//! saturated) it doubles τ and drops to 2 bits; when the queue is empty it halves τ (down to
//! a floor) and spends the headroom on 4 bits for weights. Biases always go at 8 bits.
//! The state is one little-endian f32 τ per link, in link order.
//!
//! On the LAN it takes whichever of full-precision gradient mode and data mode (4-bit
//! features, no refinement) moves fewer bits per step by the SDK's cost model, where data
//! mode is allowed.

use weightgrad_sdk::{
    DataPlan, DataScale, LanMode, LanPlan, LinkPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput,
    TensorPlan, per_link_state, per_link_values,
};

/// The adaptive policy and its knobs.
#[derive(Debug, Clone, Copy)]
pub struct Adaptive {
    /// Starting and lowest threshold.
    pub tau_floor: f32,
    /// Highest threshold.
    pub tau_ceiling: f32,
    /// Bytes queued on a link above which it counts as saturated.
    pub backlog_bytes: u64,
    /// The data mode weighed against gradient mode on the LAN.
    pub data_mode: DataPlan,
}

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            tau_floor: 0.01,
            tau_ceiling: 0.5,
            backlog_bytes: 64 << 10,
            data_mode: DataPlan {
                feature_bits: 4,
                scale: DataScale::PerFeature,
                refine_bits: 0,
            },
        }
    }
}

impl Adaptive {
    fn previous_taus(&self, input: &PolicyInput) -> Vec<f32> {
        per_link_values(
            &input.state,
            input.links.len(),
            self.tau_floor,
            self.tau_floor,
            self.tau_ceiling,
        )
    }

    /// The cheaper LAN plan by the cost model.
    fn lan_plan(&self, input: &PolicyInput) -> LanPlan {
        let gradient = LanPlan::FULL_PRECISION;
        let data = LanPlan {
            mode: LanMode::Data(self.data_mode),
            ..LanPlan::FULL_PRECISION
        };
        if input.lan.data_mode_allowed
            && input.lan.step_bits(&data) < input.lan.step_bits(&gradient)
        {
            data
        } else {
            gradient
        }
    }
}

impl Policy for Adaptive {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "adaptive".into(),
            version: "1.0.0".into(),
            description: "tau and bits per link from backlog, keeping each link under saturation"
                .into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let taus: Vec<f32> = self
            .previous_taus(input)
            .iter()
            .zip(&input.links)
            .map(|(&tau, link)| {
                let next = if link.link.queued_bytes > self.backlog_bytes {
                    tau * 2.0
                } else {
                    tau * 0.5
                };
                next.clamp(self.tau_floor, self.tau_ceiling)
            })
            .collect();
        let links = input
            .links
            .iter()
            .zip(&taus)
            .map(|(link, &tau)| {
                let saturated = link.link.queued_bytes > self.backlog_bytes;
                LinkPlan {
                    tensors: link
                        .tensors
                        .iter()
                        .map(|t| TensorPlan {
                            send: true,
                            tau: if input.context.final_round { 0.0 } else { tau },
                            bits: match (t.role.is_matrix(), saturated) {
                                (false, _) => 8,
                                (true, true) => 2,
                                (true, false) => 4,
                            },
                            top_fraction: 1.0,
                        })
                        .collect(),
                }
            })
            .collect();
        PolicyOutput {
            links,
            lan: self.lan_plan(input),
            state: per_link_state(&taus),
        }
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(Adaptive);

#[cfg(test)]
mod tests {
    use super::*;
    use weightgrad_sdk::TensorRole;
    use weightgrad_sdk::{LinkInput, LinkStats, RoundContext, TensorStats, validate_output};

    fn input(queued: u64, state: Vec<u8>) -> PolicyInput {
        PolicyInput {
            context: RoundContext {
                round: 1,
                lr: 1e-3,
                base_lr: 1e-3,
                loss: 1.0,
                regions: 2,
                final_round: false,
            },
            thresholds: vec![],
            links: vec![LinkInput {
                link: LinkStats {
                    peer: "p".into(),
                    bandwidth_bps: 1e8,
                    rtt_s: 0.1,
                    loss: 0.0,
                    queued_bytes: queued,
                },
                tensors: vec![TensorStats {
                    numel: 10,
                    role: TensorRole::Weight,
                    update_l2: 1.0,
                    weight_l2: 1.0,
                    max_relative: 1.0,
                    significant_fraction: vec![],
                    rounds_since_sent: 0,
                }],
            }],
            lan: weightgrad_sdk::golden_input().lan,
            state,
        }
    }

    #[test]
    fn takes_the_cheaper_lan_mode_where_data_mode_is_allowed() {
        let p = Adaptive::default();
        // Digits MLP, batch 64: 4-bit samples cost far less than fp32 gradients.
        let mut i = input(0, Vec::new());
        assert!(matches!(p.decide(&i).lan.mode, LanMode::Data(_)));
        assert!(validate_output(&i, &p.decide(&i)).is_ok());
        // Not allowed: gradient mode whatever the cost.
        i.lan.data_mode_allowed = false;
        assert_eq!(p.decide(&i).lan.mode, LanMode::Gradient);
        assert!(validate_output(&i, &p.decide(&i)).is_ok());
        // A tiny model on wide samples: gradients are cheaper.
        i.lan.data_mode_allowed = true;
        i.lan.tensor_sizes = vec![30, 10];
        i.lan.sample_features = 3072;
        assert_eq!(p.decide(&i).lan.mode, LanMode::Gradient);
    }

    #[test]
    fn backs_off_under_backlog_and_recovers() {
        let p = Adaptive::default();
        let mut state = Vec::new();
        let mut taus = Vec::new();
        for queued in [1 << 20, 1 << 20, 1 << 20, 0, 0] {
            let i = input(queued, state);
            let out = p.decide(&i);
            assert!(validate_output(&i, &out).is_ok());
            taus.push(out.links[0].tensors[0].tau);
            assert_eq!(out.links[0].tensors[0].bits, if queued > 0 { 2 } else { 4 });
            state = out.state;
        }
        assert_eq!(taus, [0.02, 0.04, 0.08, 0.04, 0.02]);
        // Garbage state falls back to the floor instead of failing.
        let out = p.decide(&input(0, vec![0xff; 4]));
        assert_eq!(out.links[0].tensors[0].tau, 0.01);
    }
}
