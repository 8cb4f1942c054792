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

/// A built-in policy, or for the bench a variant of the weightgrad policy with its knobs
/// changed: `weightgrad:every=N:budget=F:bits=B:tau=F:lan=B:floor=F:backlog=BYTES` (any of
/// them, in any order; the rest keep their defaults; `lan` sets the LAN gradient and weight
/// bits together, 32 for full precision; `floor` is the smallest share of the budget a link
/// that is behind is cut to, 1 for a fixed budget; `backlog` the unacknowledged bytes above
/// which a link counts as behind). Variants run natively in the simulator only:
/// to deploy one, write it as a policy (`weightgrad policy new mine --from weightgrad`).
pub fn builtin_or_variant(name: &str) -> Result<Box<dyn Policy + Send + Sync>, String> {
    let Some(knobs) = name.strip_prefix("weightgrad:") else {
        return builtin(name);
    };
    let mut p = WeightGrad::default();
    for knob in knobs.split(':') {
        let (key, value) = knob
            .split_once('=')
            .ok_or_else(|| format!("{name:?}: {knob:?} is not KNOB=VALUE"))?;
        let bad = |what: &str| format!("{name:?}: {key}={value:?} is not {what}");
        let fraction = || {
            value
                .parse()
                .ok()
                .filter(|f: &f32| *f > 0.0 && *f <= 1.0)
                .ok_or_else(|| bad("a fraction in (0, 1]"))
        };
        match key {
            "every" => {
                p.sync_every = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("a positive integer"))?
            }
            "budget" => p.weight_budget = fraction()?,
            "bits" => {
                p.weight_bits = value
                    .parse()
                    .ok()
                    .filter(|b| matches!(b, 1..=8 | 16 | 32))
                    .ok_or_else(|| bad("1..8, 16 or 32"))?
            }
            "tau" => {
                p.tau0 = value
                    .parse()
                    .ok()
                    .filter(|t: &f32| t.is_finite() && *t >= 0.0)
                    .ok_or_else(|| bad("a threshold >= 0"))?
            }
            "floor" => p.min_budget_share = fraction()?,
            "backlog" => p.backlog_bytes = value.parse().map_err(|_| bad("a number of bytes"))?,
            "lan" => {
                let bits = value
                    .parse()
                    .ok()
                    .filter(|b| matches!(b, 2..=8 | 32))
                    .ok_or_else(|| bad("2..8 or 32"))?;
                p.lan_gradient_bits = bits;
                p.lan_weight_bits = bits;
            }
            _ => {
                return Err(format!(
                    "{name:?}: unknown knob {key:?}; the weightgrad policy's are every, budget, \
                     bits, tau, lan, floor and backlog"
                ));
            }
        }
    }
    Ok(Box::new(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weightgrad_variants_change_only_the_knobs_named() {
        let input = weightgrad_sdk::golden_input();
        let default = builtin("weightgrad").unwrap().decide(&input);
        let same = builtin_or_variant("weightgrad:every=1")
            .unwrap()
            .decide(&input);
        assert_eq!(default, same);
        let wider = builtin_or_variant("weightgrad:budget=0.5:bits=4")
            .unwrap()
            .decide(&input);
        let weight_plan = &wider.links[0].tensors[0];
        assert_eq!((weight_plan.bits, weight_plan.top_fraction), (4, 0.5));
        let full_lan = builtin_or_variant("weightgrad:lan=32")
            .unwrap()
            .decide(&input);
        assert_eq!(full_lan.lan.weight_bits, 32);
        assert!(full_lan.lan.gradient_bits.iter().all(|&b| b == 32));
        assert_eq!(full_lan.links, default.links);
        // 32 KiB unacknowledged at a sync: behind for a 16 KiB threshold, not for the
        // default's.
        let mut queued = input.clone();
        queued.context.round = 3;
        queued.links[0].link.queued_bytes = 32 << 10;
        let budget = |name: &str| {
            builtin_or_variant(name).unwrap().decide(&queued).links[0].tensors[0].top_fraction
        };
        assert_eq!(budget("weightgrad"), 0.005);
        assert_eq!(budget("weightgrad:backlog=16384"), 0.0025);
        for bad in [
            "weightgrad:lan=16",
            "weightgrad:floor=0",
            "weightgrad:backlog=-1",
            "weightgrad:every=0",
            "weightgrad:speed=2",
            "weightgrad:bits",
            "gaia:every=2",
        ] {
            assert!(builtin_or_variant(bad).is_err(), "{bad}");
        }
    }
}
