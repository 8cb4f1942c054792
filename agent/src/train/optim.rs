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

/// One Adam step's constants, as the tensor path rounds them to f32, for the fused CPU
/// path: the same scalar operations in the same order, so both give the same bits.
#[derive(Debug, Clone, Copy)]
struct AdamStep {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `1 / (1 − β1^t)` and `1 / (1 − β2^t)`: candle divides by a scalar as a product
    /// with its inverse.
    unbias1: f32,
    unbias2: f32,
    eps: f32,
    lr: f32,
    /// `lr · weight decay`, applied when the decay is not zero.
    decay: Option<f32>,
}

impl AdamStep {
    fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64, lr: f64, t: i32) -> Self {
        Self {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            unbias1: (1.0 / (1.0 - beta1.powi(t))) as f32,
            unbias2: (1.0 / (1.0 - beta2.powi(t))) as f32,
            eps: eps as f32,
            lr: lr as f32,
            decay: (weight_decay != 0.0).then_some((lr * weight_decay) as f32),
        }
    }

    /// One element: `(w', m', v')`. Each `x · s + 0` is candle's scalar product (an
    /// affine map), kept as such so that −0 becomes +0 where the tensor path makes it so.
    #[inline]
    fn element(&self, w: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m = (m * self.beta1 + 0.0) + (g * self.one_minus_beta1 + 0.0);
        let v = (v * self.beta2 + 0.0) + ((g * g) * self.one_minus_beta2 + 0.0);
        let m_hat = m * self.unbias1 + 0.0;
        let v_hat = v * self.unbias2 + 0.0;
        let update = m_hat / (v_hat.sqrt() + self.eps);
        let mut next = w - (update * self.lr + 0.0);
        if let Some(decay) = self.decay {
            next -= w * decay + 0.0;
        }
        (next, m, v)
    }

    /// The step in one pass over contiguous f32 CPU tensors: `(w', m', v')`; `None` for
    /// any other (a GPU, another dtype or layout), which takes the tensor path.
    fn fused(
        &self,
        w: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let held = [w, g, m, v].map(|t| t.storage_and_layout());
        let mut slices: Vec<&[f32]> = Vec::with_capacity(4);
        for (storage, layout) in &held {
            let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &**storage else {
                return Ok(None);
            };
            if !layout.is_contiguous() {
                return Ok(None);
            }
            let start = layout.start_offset();
            let Some(elements) = data.get(start..start + layout.shape().elem_count()) else {
                return Ok(None);
            };
            slices.push(elements);
        }
        let [ws, gs, ms, vs] = slices[..] else {
            return Ok(None);
        };
        if gs.len() != ws.len() || ms.len() != ws.len() || vs.len() != ws.len() {
            return Ok(None);
        }
        let n = ws.len();
        let (mut next, mut m_out, mut v_out) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        // Equal-length slices zipped: no bounds checks, so the loop can vectorize.
        let outputs = next.iter_mut().zip(&mut m_out).zip(&mut v_out);
        let inputs = ws.iter().zip(gs).zip(ms).zip(vs);
        for (((w_out, m_new), v_new), (((&w, &g), &m), &v)) in outputs.zip(inputs) {
            (*w_out, *m_new, *v_new) = self.element(w, g, m, v);
        }
        drop(held);
        let tensor = |data: Vec<f32>| Tensor::from_vec(data, w.shape(), w.device());
        Ok(Some((tensor(next)?, tensor(m_out)?, tensor(v_out)?)))
    }
}

/// Adam's step with candle's tensor operations (any device): `[w, g, m, v]` to
/// `(w', m', v')`, with `(β1, β2, ε, weight decay)`, at step `t`.
fn adam_by_tensor_ops(
    (beta1, beta2, eps, weight_decay): (f64, f64, f64, f64),
    lr: f64,
    t: i32,
    [w, g, m, v]: [&Tensor; 4],
) -> Result<(Tensor, Tensor, Tensor)> {
    let m = ((m * beta1)? + (g * (1.0 - beta1))?)?;
    let v = ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let m_hat = (&m / (1.0 - beta1.powi(t)))?;
    let v_hat = (&v / (1.0 - beta2.powi(t)))?;
    let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
    let mut next = (w - (update * lr)?)?;
    if weight_decay != 0.0 {
        next = (next - (w * (lr * weight_decay))?)?;
    }
    Ok((next, m, v))
}

/// An optimizer bound to a fixed list of parameters.
pub struct Optimizer {
    spec: OptimizerSpec,
    /// `slots[k][i]`: state slot `k` of parameter `i`.
    slots: Vec<Vec<Tensor>>,
    steps: u64,
    /// Whether contiguous f32 CPU parameters take Adam's one-pass step.
    fused: bool,
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
            fused: true,
        })
    }

    /// Whether contiguous f32 CPU parameters take Adam's one-pass step (the default), or
    /// candle's tensor operations as on other devices; both give the same bits, so this
    /// only compares their speed.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
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
                    let adam = AdamStep::new(beta1, beta2, eps, weight_decay, lr, t);
                    let (m, v) = (&self.slots[0][i], &self.slots[1][i]);
                    let fused = if self.fused {
                        adam.fused(w, g, m, v)?
                    } else {
                        None
                    };
                    let (next, m, v) = match fused {
                        Some(fused) => fused,
                        None => adam_by_tensor_ops(
                            (beta1, beta2, eps, weight_decay),
                            lr,
                            t,
                            [w, g, m, v],
                        )?,
                    };
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

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// The fused CPU step gives the tensor path's bits, step after step, with and without
    /// weight decay, on values that include zeros and negative zeros.
    #[test]
    fn the_fused_adam_step_is_bit_for_bit_the_tensor_path() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let n = 4099;
        let mut values = |scale: f32| -> Tensor {
            let v: Vec<f32> = (0..n)
                .map(|k| match k % 97 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => rng.random_range(-1.0f32..1.0) * scale,
                })
                .collect();
            Tensor::from_vec(v, (n, 1), &Device::Cpu).unwrap()
        };
        for weight_decay in [0.0, 0.01] {
            let hyper = (0.9, 0.999, 1e-8, weight_decay);
            let mut w = values(1.0);
            let (mut m, mut v) = (w.zeros_like().unwrap(), w.zeros_like().unwrap());
            for t in 1..=5 {
                let g = values(1e-2);
                let lr = 1e-3 * t as f64;
                let adam = AdamStep::new(hyper.0, hyper.1, hyper.2, hyper.3, lr, t);
                let fused = adam.fused(&w, &g, &m, &v).unwrap().expect("CPU f32");
                let ops = adam_by_tensor_ops(hyper, lr, t, [&w, &g, &m, &v]).unwrap();
                assert_eq!(
                    bits(&fused.0),
                    bits(&ops.0),
                    "w, step {t}, decay {weight_decay}"
                );
                assert_eq!(bits(&fused.1), bits(&ops.1), "m, step {t}");
                assert_eq!(bits(&fused.2), bits(&ops.2), "v, step {t}");
                (w, m, v) = fused;
            }
        }
        // Another dtype takes the tensor path.
        let wide = Tensor::zeros(4, candle_core::DType::F64, &Device::Cpu).unwrap();
        let adam = AdamStep::new(0.9, 0.999, 1e-8, 0.0, 1e-3, 1);
        assert!(adam.fused(&wide, &wide, &wide, &wide).unwrap().is_none());
    }

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
