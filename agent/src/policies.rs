//! The policies compiled into the agent, by name.

use weightgrad_policy_full_sync::FullSync;
use weightgrad_policy_gaia::Gaia;
use weightgrad_policy_weightgrad::WeightGrad;
use weightgrad_sdk::Policy;

/// Names of the built-in policies.
pub const BUILTIN: [&str; 3] = ["full-sync", "gaia", "weightgrad"];

/// A built-in policy by name, or an error listing the known ones.
pub fn builtin(name: &str) -> Result<Box<dyn Policy + Send + Sync>, String> {
    match name {
        "full-sync" => Ok(Box::new(FullSync)),
        "gaia" => Ok(Box::new(Gaia::default())),
        "weightgrad" => Ok(Box::new(WeightGrad::default())),
        _ => Err(format!(
            "unknown policy {name:?}; built-in policies are {}",
            BUILTIN.join(", ")
        )),
    }
}
