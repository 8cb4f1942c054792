//! Guest glue (WebAssembly only): the WIT bindings and the conversions between their types
//! and this crate's plain Rust types. Policy authors use [`crate::export_policy!`].

#![allow(missing_docs)]

/// Bindings generated from `sdk/wit/policy.wit`.
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "guest",
        pub_export_macro: true,
        default_bindings_module: "weightgrad_sdk::guest::bindings",
        export_macro_name: "export_guest",
    });
}

use bindings::weightgrad::policy::types as t;

fn role(r: t::TensorRole) -> crate::TensorRole {
    match r {
        t::TensorRole::Weight => crate::TensorRole::Weight,
        t::TensorRole::Bias => crate::TensorRole::Bias,
        t::TensorRole::Embedding => crate::TensorRole::Embedding,
        t::TensorRole::Attention => crate::TensorRole::Attention,
        t::TensorRole::Norm => crate::TensorRole::Norm,
    }
}

/// WIT input to SDK input.
pub fn input_from_wit(i: t::PolicyInput) -> crate::PolicyInput {
    let c = i.context;
    crate::PolicyInput {
        context: crate::RoundContext {
            round: c.round,
            lr: c.lr,
            base_lr: c.base_lr,
            loss: c.loss,
            regions: c.regions,
            final_round: c.final_round,
        },
        thresholds: i.thresholds,
        links: i
            .links
            .into_iter()
            .map(|l| crate::LinkInput {
                link: crate::LinkStats {
                    peer: l.link.peer,
                    bandwidth_bps: l.link.bandwidth_bps,
                    rtt_s: l.link.rtt_s,
                    loss: l.link.loss,
                    queued_bytes: l.link.queued_bytes,
                },
                tensors: l
                    .tensors
                    .into_iter()
                    .map(|t| crate::TensorStats {
                        numel: t.numel,
                        role: role(t.role),
                        update_l2: t.update_l2,
                        weight_l2: t.weight_l2,
                        max_relative: t.max_relative,
                        significant_fraction: t.significant_fraction,
                        rounds_since_sent: t.rounds_since_sent,
                    })
                    .collect(),
            })
            .collect(),
        lan: crate::LanInput {
            workers: i.lan.workers,
            batch_size: i.lan.batch_size,
            sample_features: i.lan.sample_features,
            classes: i.lan.classes,
            tensor_sizes: i.lan.tensor_sizes,
            data_mode_allowed: i.lan.data_mode_allowed,
        },
        state: i.state,
    }
}

/// SDK output to WIT output.
pub fn output_to_wit(o: crate::PolicyOutput) -> t::PolicyOutput {
    t::PolicyOutput {
        links: o
            .links
            .into_iter()
            .map(|l| t::LinkPlan {
                tensors: l
                    .tensors
                    .into_iter()
                    .map(|p| t::TensorPlan {
                        send: p.send,
                        tau: p.tau,
                        bits: p.bits,
                        top_fraction: p.top_fraction,
                    })
                    .collect(),
            })
            .collect(),
        lan: t::LanPlan {
            gradient_bits: o.lan.gradient_bits,
            weight_bits: o.lan.weight_bits,
            mode: match o.lan.mode {
                crate::LanMode::Gradient => t::LanMode::Gradient,
                crate::LanMode::Data(d) => t::LanMode::Data(t::DataPlan {
                    feature_bits: d.feature_bits,
                    scale: match d.scale {
                        crate::DataScale::PerFeature => t::DataScale::PerFeature,
                        crate::DataScale::PerSample => t::DataScale::PerSample,
                    },
                    refine_bits: d.refine_bits,
                }),
            },
        },
        state: o.state,
    }
}

/// SDK info to WIT info.
pub fn info_to_wit(i: crate::PolicyInfo) -> t::PolicyInfo {
    t::PolicyInfo {
        name: i.name,
        version: i.version,
        description: i.description,
    }
}

/// Exports a policy type (implementing [`crate::Policy`] and [`Default`]) as the
/// component's `weightgrad:policy/policy@3.0.0` interface. Use it once per policy crate,
/// under `#[cfg(target_arch = "wasm32")]`.
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        struct __WeightGradPolicyExport;

        impl $crate::guest::bindings::exports::weightgrad::policy::policy::Guest
            for __WeightGradPolicyExport
        {
            fn info() -> $crate::guest::bindings::weightgrad::policy::types::PolicyInfo {
                $crate::guest::info_to_wit($crate::Policy::info(&<$ty as Default>::default()))
            }

            fn decide(
                input: $crate::guest::bindings::weightgrad::policy::types::PolicyInput,
            ) -> Result<$crate::guest::bindings::weightgrad::policy::types::PolicyOutput, String> {
                let input = $crate::guest::input_from_wit(input);
                let output = $crate::Policy::decide(&<$ty as Default>::default(), &input);
                Ok($crate::guest::output_to_wit(output))
            }
        }

        $crate::guest::bindings::export_guest!(
            __WeightGradPolicyExport with_types_in $crate::guest::bindings
        );
    };
}
