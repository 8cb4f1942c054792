//! Host bindings for `sdk/wit/policy.wit` and conversions to and from the SDK's types.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "guest",
});

use self::weightgrad::policy::types as t;

fn role(r: weightgrad_sdk::TensorRole) -> t::TensorRole {
    match r {
        weightgrad_sdk::TensorRole::Weight => t::TensorRole::Weight,
        weightgrad_sdk::TensorRole::Bias => t::TensorRole::Bias,
        weightgrad_sdk::TensorRole::Embedding => t::TensorRole::Embedding,
        weightgrad_sdk::TensorRole::Attention => t::TensorRole::Attention,
        weightgrad_sdk::TensorRole::Norm => t::TensorRole::Norm,
    }
}

/// SDK input to WIT input.
pub fn input_to_wit(i: &weightgrad_sdk::PolicyInput) -> t::PolicyInput {
    let c = &i.context;
    t::PolicyInput {
        context: t::RoundContext {
            round: c.round,
            lr: c.lr,
            base_lr: c.base_lr,
            loss: c.loss,
            regions: c.regions,
            final_round: c.final_round,
        },
        thresholds: i.thresholds.clone(),
        links: i
            .links
            .iter()
            .map(|l| t::LinkInput {
                link: t::LinkStats {
                    peer: l.link.peer.clone(),
                    bandwidth_bps: l.link.bandwidth_bps,
                    rtt_s: l.link.rtt_s,
                    loss: l.link.loss,
                    queued_bytes: l.link.queued_bytes,
                },
                tensors: l
                    .tensors
                    .iter()
                    .map(|s| t::TensorStats {
                        numel: s.numel,
                        role: role(s.role),
                        update_l2: s.update_l2,
                        weight_l2: s.weight_l2,
                        max_relative: s.max_relative,
                        significant_fraction: s.significant_fraction.clone(),
                        rounds_since_sent: s.rounds_since_sent,
                    })
                    .collect(),
            })
            .collect(),
        lan: t::LanInput {
            workers: i.lan.workers,
            batch_size: i.lan.batch_size,
            sample_features: i.lan.sample_features,
            classes: i.lan.classes,
            tensor_sizes: i.lan.tensor_sizes.clone(),
            data_mode_allowed: i.lan.data_mode_allowed,
        },
        state: i.state.clone(),
    }
}

/// WIT output to SDK output.
pub fn output_from_wit(o: t::PolicyOutput) -> weightgrad_sdk::PolicyOutput {
    weightgrad_sdk::PolicyOutput {
        links: o
            .links
            .into_iter()
            .map(|l| weightgrad_sdk::LinkPlan {
                tensors: l
                    .tensors
                    .into_iter()
                    .map(|p| weightgrad_sdk::TensorPlan {
                        send: p.send,
                        tau: p.tau,
                        bits: p.bits,
                        top_fraction: p.top_fraction,
                    })
                    .collect(),
            })
            .collect(),
        lan: weightgrad_sdk::LanPlan {
            gradient_bits: o.lan.gradient_bits,
            weight_bits: o.lan.weight_bits,
            mode: match o.lan.mode {
                t::LanMode::Gradient => weightgrad_sdk::LanMode::Gradient,
                t::LanMode::Data(d) => weightgrad_sdk::LanMode::Data(weightgrad_sdk::DataPlan {
                    feature_bits: d.feature_bits,
                    scale: match d.scale {
                        t::DataScale::PerFeature => weightgrad_sdk::DataScale::PerFeature,
                        t::DataScale::PerSample => weightgrad_sdk::DataScale::PerSample,
                    },
                    refine_bits: d.refine_bits,
                }),
            },
        },
        state: o.state,
    }
}

/// WIT info to SDK info.
pub fn info_from_wit(i: t::PolicyInfo) -> weightgrad_sdk::PolicyInfo {
    weightgrad_sdk::PolicyInfo {
        name: i.name,
        version: i.version,
        description: i.description,
    }
}
