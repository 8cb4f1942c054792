//! Learning-rate schedules as a pure function of the step.

use serde::{Deserialize, Serialize};

/// Rounds between evaluations on the test set: `every`, or one epoch's rounds when unset
/// (at least 1). The agent and the simulator both evaluate at its multiples and at the
/// last round.
pub fn evaluation_interval(every: Option<u64>, steps_per_epoch: u64) -> u64 {
    every.unwrap_or(steps_per_epoch).max(1)
}

/// How the learning rate evolves over a run of `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum LrSchedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Multiply by `gamma` every `every_steps` steps.
    Step {
        /// Steps between decays.
        every_steps: u64,
        /// Decay factor.
        gamma: f64,
    },
    /// Half-cosine from the base rate down to `base · min_factor` at the last step.
    Cosine {
        /// Final rate as a fraction of the base.
        min_factor: f64,
    },
}

impl LrSchedule {
    /// Parses `constant`, `step:EPOCHS:GAMMA` or `cosine[:MIN_FACTOR]`; epochs become steps.
    pub fn parse(s: &str, steps_per_epoch: u64) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str, what: &str| -> Result<f64, String> {
            p.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("schedule {s:?}: {what} {p:?} is not a non-negative number"))
        };
        match parts.as_slice() {
            ["constant"] => Ok(Self::Constant),
            ["step", every, gamma] => {
                let epochs = num(every, "epochs")?;
                if epochs <= 0.0 {
                    return Err(format!("schedule {s:?}: step interval must be positive"));
                }
                Ok(Self::Step {
                    every_steps: ((epochs * steps_per_epoch as f64).round() as u64).max(1),
                    gamma: num(gamma, "gamma")?,
                })
            }
            ["cosine"] => Ok(Self::Cosine { min_factor: 0.0 }),
            ["cosine", min] => Ok(Self::Cosine {
                min_factor: num(min, "min factor")?,
            }),
            _ => Err(format!(
                "unknown schedule {s:?}; expected constant, step:EPOCHS:GAMMA or cosine[:MIN]"
            )),
        }
    }

    /// The rate at zero-based `step` of `total_steps`.
    pub fn lr_at(&self, base: f64, step: u64, total_steps: u64) -> f64 {
        match *self {
            Self::Constant => base,
            Self::Step { every_steps, gamma } => {
                base * gamma.powi((step / every_steps.max(1)) as i32)
            }
            Self::Cosine { min_factor } => {
                let progress = step as f64 / total_steps.saturating_sub(1).max(1) as f64;
                let c = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
                base * (min_factor + (1.0 - min_factor) * c)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluations_default_to_once_an_epoch_and_never_to_zero() {
        assert_eq!(evaluation_interval(None, 625), 625);
        assert_eq!(evaluation_interval(Some(25), 625), 25);
        assert_eq!(evaluation_interval(None, 0), 1);
    }

    #[test]
    fn schedules_follow_their_formulas() {
        assert_eq!(LrSchedule::Constant.lr_at(0.1, 50, 100), 0.1);
        let s = LrSchedule::parse("step:2:0.5", 10).unwrap();
        assert_eq!(
            s,
            LrSchedule::Step {
                every_steps: 20,
                gamma: 0.5
            }
        );
        assert_eq!(s.lr_at(1.0, 19, 100), 1.0);
        assert_eq!(s.lr_at(1.0, 20, 100), 0.5);
        assert_eq!(s.lr_at(1.0, 45, 100), 0.25);
        let c = LrSchedule::parse("cosine:0.1", 1).unwrap();
        assert!((c.lr_at(1.0, 0, 101) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(1.0, 50, 101) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(1.0, 100, 101) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn bad_schedules_are_errors() {
        for bad in ["linear", "step:0:0.5", "step:1", "cosine:-1", "step:x:1"] {
            assert!(LrSchedule::parse(bad, 10).is_err(), "{bad}");
        }
    }
}
