//! The policies compiled into the agent, by name.

use weightgrad_policy_adaptive::Adaptive;
use weightgrad_policy_diloco::DiLoCo;
use weightgrad_policy_full_sync::FullSync;
use weightgrad_policy_gaia::Gaia;
use weightgrad_policy_qsgd::Qsgd;
use weightgrad_policy_terngrad::TernGrad;
use weightgrad_policy_topk::TopK;
use weightgrad_policy_weightgrad::WeightGrad;
use weightgrad_sdk::Policy;

/// Names of the built-in policies.
pub const BUILTIN: [&str; 8] = [
    "full-sync",
    "gaia",
    "terngrad",
    "qsgd",
    "topk",
    "weightgrad",
    "diloco",
    "adaptive",
];

/// How the agent merges peers' updates for a built-in policy: DiLoCo averages with an outer
/// optimizer every `DEFAULT_EVERY` rounds; the others add updates as they arrive.
pub fn merge_mode_for(name: &str) -> crate::sync::MergeMode {
    match name {
        "diloco" => crate::sync::MergeMode::Mean {
            every: weightgrad_policy_diloco::DEFAULT_EVERY,
            outer_lr: 0.7,
            momentum: 0.9,
        },
        _ => crate::sync::MergeMode::Sum,
    }
}

/// A built-in policy by name, or an error listing the known ones.
pub fn builtin(name: &str) -> Result<Box<dyn Policy + Send + Sync>, String> {
    match name {
        "full-sync" => Ok(Box::new(FullSync)),
        "gaia" => Ok(Box::new(Gaia::default())),
        "weightgrad" => Ok(Box::new(WeightGrad::default())),
        "diloco" => Ok(Box::new(DiLoCo::default())),
        "terngrad" => Ok(Box::new(TernGrad)),
        "qsgd" => Ok(Box::new(Qsgd::default())),
        "topk" => Ok(Box::new(TopK::default())),
        "adaptive" => Ok(Box::new(Adaptive::default())),
        _ => Err(format!(
            "unknown policy {name:?}; built-in policies are {}",
            BUILTIN.join(", ")
        )),
    }
}
