//! Optimizers on candle parameters: SGD with momentum and weight decay, and Adam.
//!
//! State is kept per parameter in manifest order and can be exported for checkpoints.
//! Adam's second moment is also what loss-aware weight quantization weighs errors by.

use anyhow::{Result, ensure};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// Optimizer choice and hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum OptimizerSpec {
    /// `v = μv + g + λw; w -= lr·v`.
    Sgd {
        /// Momentum μ (0 disables it).
        momentum: f64,
        /// L2 weight decay λ added to the gradient.
        weight_decay: f64,
    },
    /// Adam with bias correction; `weight_decay` is decoupled (AdamW) when non-zero.
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator guard.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

impl OptimizerSpec {
    /// Adam with the usual defaults.
    pub fn adam() -> Self {
        Self::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// SGD with momentum 0.9 and no weight decay.
    pub fn sgd() -> Self {
        Self::Sgd {
            momentum: 0.9,
            weight_decay: 0.0,
        }
    }

    /// Names of the per-parameter state slots, in export order.
    pub fn slot_names(&self) -> &'static [&'static str] {
        match self {
            Self::Sgd { .. } => &["momentum"],
            Self::Adam { .. } => &["m", "v"],
        }
    }
}

/// An optimizer bound to a fixed list of parameters.
pub struct Optimizer {
    spec: OptimizerSpec,
    /// `slots[k][i]`: state slot `k` of parameter `i`.
    slots: Vec<Vec<Tensor>>,
    steps: u64,
}

impl Optimizer {
    /// Creates zeroed state for `vars`.
    pub fn new(spec: OptimizerSpec, vars: &[Var]) -> Result<Self> {
        let slots = spec
            .slot_names()
            .iter()
            .map(|_| vars.iter().map(|v| v.as_tensor().zeros_like()).collect())
            .collect::<candle_core::Result<Vec<Vec<_>>>>()?;
        Ok(Self {
            spec,
            slots,
            steps: 0,
        })
    }

    /// The hyper-parameters.
    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Number of steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Adam's bias-corrected second moment per parameter (`None` for SGD).
    pub fn second_moment(&self) -> Option<Vec<Tensor>> {
        let OptimizerSpec::Adam { beta2, .. } = self.spec else {
            return None;
        };
        let correction = 1.0 - beta2.powi(self.steps.max(1) as i32);
        self.slots[1]
            .iter()
            .map(|v| (v / correction).ok())
            .collect()
    }

    /// Applies one update with learning rate `lr` from `grads` (manifest order).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        ensure!(
            vars.len() == grads.len(),
            "{} gradients for {} parameters",
            grads.len(),
            vars.len()
        );
        self.steps += 1;
        let t = self.steps as i32;
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let w = var.as_tensor();
            let next = match self.spec {
                OptimizerSpec::Sgd {
                    momentum,
                    weight_decay,
                } => {
                    let g = if weight_decay != 0.0 {
                        (g + (w * weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let v = if momentum != 0.0 {
                        ((&self.slots[0][i] * momentum)? + g)?
                    } else {
                        g
                    };
                    let next = (w - (&v * lr)?)?;
                    self.slots[0][i] = v;
                    next
                }
                OptimizerSpec::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let m = ((&self.slots[0][i] * beta1)? + (g * (1.0 - beta1))?)?;
                    let v = ((&self.slots[1][i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let m_hat = (&m / (1.0 - beta1.powi(t)))?;
                    let v_hat = (&v / (1.0 - beta2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
                    let mut next = (w - (update * lr)?)?;
                    if weight_decay != 0.0 {
                        next = (next - (w * (lr * weight_decay))?)?;
                    }
                    self.slots[0][i] = m;
                    self.slots[1][i] = v;
                    next
                }
            };
            var.set(&next)?;
        }
        Ok(())
    }

    /// Exports `(slot name, per-parameter tensors)` and the step count for a checkpoint.
    pub fn state(&self) -> (Vec<(&'static str, &[Tensor])>, u64) {
        let slots = self
            .spec
            .slot_names()
            .iter()
            .zip(&self.slots)
            .map(|(n, s)| (*n, s.as_slice()))
            .collect();
        (slots, self.steps)
    }

    /// Restores state exported by [`Optimizer::state`]; shapes must match.
    pub fn restore(&mut self, slots: Vec<Vec<Tensor>>, steps: u64) -> Result<()> {
        ensure!(
            slots.len() == self.slots.len(),
            "optimizer state has {} slots, expected {}",
            slots.len(),
            self.slots.len()
        );
        for (have, got) in self.slots.iter().zip(&slots) {
            ensure!(
                have.len() == got.len(),
                "optimizer state covers {} tensors, expected {}",
                got.len(),
                have.len()
            );
            for (h, g) in have.iter().zip(got) {
                ensure!(
                    h.dims() == g.dims(),
                    "optimizer state shape {:?}, expected {:?}",
                    g.dims(),
                    h.dims()
                );
            }
        }
        self.slots = slots;
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn quadratic_descent(spec: OptimizerSpec, lr: f64) -> f32 {
        // Minimise 0.5·|w - 3|² from w = 0: the gradient is w - 3.
        let var = Var::from_slice(&[0.0f32, 0.0], 2, &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(spec, std::slice::from_ref(&var)).unwrap();
        for _ in 0..300 {
            let g = (var.as_tensor() - 3.0).unwrap();
            opt.step(std::slice::from_ref(&var), &[g], lr).unwrap();
        }
        var.as_tensor().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn sgd_and_adam_converge_on_a_quadratic() {
        assert!((quadratic_descent(OptimizerSpec::sgd(), 0.05) - 3.0).abs() < 1e-3);
        assert!((quadratic_descent(OptimizerSpec::adam(), 0.05) - 3.0).abs() < 1e-2);
    }

    #[test]
    fn sgd_without_momentum_is_plain_gradient_descent() {
        let var = Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap();
        let spec = OptimizerSpec::Sgd {
            momentum: 0.0,
            weight_decay: 0.5,
        };
        let mut opt = Optimizer::new(spec, std::slice::from_ref(&var)).unwrap();
        let g = Tensor::from_slice(&[2.0f32], 1, &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&var), &[g], 0.1).unwrap();
        // w - lr·(g + λw) = 1 - 0.1·(2 + 0.5)
        let w = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((w - 0.75).abs() < 1e-6, "{w}");
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        let var = Var::from_slice(&[0.0f32, 0.0], 2, &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(OptimizerSpec::adam(), std::slice::from_ref(&var)).unwrap();
        let g = Tensor::from_slice(&[4.0f32, -0.01], 2, &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&var), &[g], 0.01).unwrap();
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (w[0] + 0.01).abs() < 1e-5 && (w[1] - 0.01).abs() < 1e-5,
            "{w:?}"
        );
        assert!(opt.second_moment().unwrap()[0].to_vec1::<f32>().unwrap()[0] > 15.9);
    }
}
