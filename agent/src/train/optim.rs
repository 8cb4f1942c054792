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

    /// The step in one pass over contiguous f32 CPU tensors: writes `w'` into `var` in
    /// place and returns `(m', v')`; `None` for any other (a GPU, another dtype or layout),
    /// which takes the tensor path.
    fn fused(
        &self,
        var: &Var,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let w = var.as_tensor();
        let cpu_f32 = |t: &Tensor| {
            crate::train::cpu_buffers::is_contiguous_cpu_f32(t) && t.elem_count() == w.elem_count()
        };
        if ![w, g, m, v].into_iter().all(cpu_f32) {
            return Ok(None);
        }
        let n = w.elem_count();
        let (mut m_out, mut v_out) = (Vec::with_capacity(n), Vec::with_capacity(n));
        crate::train::cpu_buffers::with_cpu_f32(g, "a gradient", |gs| {
            crate::train::cpu_buffers::with_cpu_f32(m, "Adam's first moment", |ms| {
                crate::train::cpu_buffers::with_cpu_f32(v, "Adam's second moment", |vs| {
                    w.inplace_op1(&AdamInPlace {
                        step: self,
                        inputs: [gs, ms, vs],
                        outputs: std::cell::RefCell::new([&mut m_out, &mut v_out]),
                    })?;
                    Ok(())
                })
            })
        })?;
        let tensor = |data: Vec<f32>| Tensor::from_vec(data, w.shape(), w.device());
        Ok(Some((tensor(m_out)?, tensor(v_out)?)))
    }

    /// `w ← w'` in place over `w`, `(m', v')` into `outputs` (empty, with room for `w.len()`):
    /// one pass, no buffer zeroed first.
    #[inline(always)]
    fn apply_in_place(
        &self,
        w: &mut [f32],
        [g, m, v]: [&[f32]; 3],
        [m_out, v_out]: [&mut Vec<f32>; 2],
    ) {
        let n = w.len();
        assert!(g.len() == n && m.len() == n && v.len() == n);
        assert!(m_out.capacity() >= n && v_out.capacity() >= n);
        let (mo, vo) = (
            &mut m_out.spare_capacity_mut()[..n],
            &mut v_out.spare_capacity_mut()[..n],
        );
        // Equal-length slices zipped: no bounds checks, so the loop can vectorize.
        let outputs = w.iter_mut().zip(mo.iter_mut()).zip(vo.iter_mut());
        let inputs = g.iter().zip(m).zip(v);
        for (((w, m_new), v_new), ((&g, &m), &v)) in outputs.zip(inputs) {
            let (next, m, v) = self.element(*w, g, m, v);
            *w = next;
            m_new.write(m);
            v_new.write(v);
        }
        // SAFETY: the loop wrote each of the first `n` elements of both (the zip runs over
        // all `n`: every slice above has `n` elements).
        unsafe {
            m_out.set_len(n);
            v_out.set_len(n);
        }
    }

    /// [`Self::apply_in_place`] compiled with AVX2 (the same operations, eight lanes at once).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn apply_in_place_avx2(&self, w: &mut [f32], inputs: [&[f32]; 3], outputs: [&mut Vec<f32>; 2]) {
        self.apply_in_place(w, inputs, outputs);
    }
}

/// Adam's fused step as an in-place op on `w`'s storage.
struct AdamInPlace<'a, 'o> {
    step: &'a AdamStep,
    /// `g`, `m`, `v`.
    inputs: [&'a [f32]; 3],
    /// Where `m'` and `v'` go.
    outputs: std::cell::RefCell<[&'o mut Vec<f32>; 2]>,
}

impl candle_core::InplaceOp1 for AdamInPlace<'_, '_> {
    fn name(&self) -> &'static str {
        "adam"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("adam: the parameter is not f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("adam: the parameter is not contiguous")
        };
        let w = &mut data[start..end];
        if self.inputs.iter().any(|x| x.len() != w.len()) {
            candle_core::bail!(
                "adam: the gradient or the moments differ in size from the parameter"
            )
        }
        let mut outputs = self.outputs.borrow_mut();
        let [m_out, v_out] = &mut *outputs;
        let outputs = [&mut **m_out, &mut **v_out];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: this CPU has AVX2 (checked just above).
            unsafe { self.step.apply_in_place_avx2(w, self.inputs, outputs) };
            return Ok(());
        }
        self.step.apply_in_place(w, self.inputs, outputs);
        Ok(())
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

    /// Writes the LAN's curvature weights of parameter `i`, `sqrt(max(v̂, 0)) + eps` from
    /// Adam's bias-corrected second moment `v̂` (the same bits as computing it from
    /// [`Self::second_moment`]), into `out`, in one pass over the moment where it is a
    /// CPU `f32` tensor. `false` (and `out` untouched) for SGD or an unknown parameter.
    pub fn curvature_into(&self, i: usize, eps: f32, out: &mut Vec<f32>) -> Result<bool> {
        let OptimizerSpec::Adam { beta2, .. } = self.spec else {
            return Ok(false);
        };
        let Some(v) = self.slots[1].get(i) else {
            return Ok(false);
        };
        let correction = 1.0 - beta2.powi(self.steps.max(1) as i32);
        // `v / correction` is candle's affine map `v · (1/correction) + 0` in f32.
        let (mul, add) = ((1.0 / correction) as f32, 0.0f32);
        let curvature = |v: f32| (v * mul + add).max(0.0).sqrt() + eps;
        out.clear();
        if crate::train::cpu_buffers::is_contiguous_cpu_f32(v) {
            crate::train::cpu_buffers::with_cpu_f32(v, "Adam's second moment", |v| {
                out.extend(v.iter().map(|&v| curvature(v)));
                Ok(())
            })?;
        } else {
            let v_hat = (v / correction)?.flatten_all()?.to_vec1::<f32>()?;
            out.extend(v_hat.into_iter().map(|v| v.max(0.0).sqrt() + eps));
        }
        Ok(true)
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
                        adam.fused(var, g, m, v)?
                    } else {
                        None
                    };
                    let (next, m, v) = match fused {
                        Some((m, v)) => (None, m, v),
                        None => {
                            let (next, m, v) = adam_by_tensor_ops(
                                (beta1, beta2, eps, weight_decay),
                                lr,
                                t,
                                [w, g, m, v],
                            )?;
                            (Some(next), m, v)
                        }
                    };
                    self.slots[0][i] = m;
                    self.slots[1][i] = v;
                    match next {
                        Some(next) => next,
                        // Written in place.
                        None => continue,
                    }
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
            let var = Var::from_tensor(&values(1.0)).unwrap();
            let (mut m, mut v) = (var.zeros_like().unwrap(), var.zeros_like().unwrap());
            for t in 1..=5 {
                let g = values(1e-2);
                let lr = 1e-3 * t as f64;
                let adam = AdamStep::new(hyper.0, hyper.1, hyper.2, hyper.3, lr, t);
                // The tensor path first: the fused step overwrites w.
                let w = var.as_tensor().copy().unwrap();
                let ops = adam_by_tensor_ops(hyper, lr, t, [&w, &g, &m, &v]).unwrap();
                let fused = adam.fused(&var, &g, &m, &v).unwrap().expect("CPU f32");
                assert_eq!(
                    bits(var.as_tensor()),
                    bits(&ops.0),
                    "w, step {t}, decay {weight_decay}"
                );
                assert_eq!(bits(&fused.0), bits(&ops.1), "m, step {t}");
                assert_eq!(bits(&fused.1), bits(&ops.2), "v, step {t}");
                (m, v) = fused;
            }
        }
        // Another dtype takes the tensor path.
        let wide = Var::zeros(4, candle_core::DType::F64, &Device::Cpu).unwrap();
        let adam = AdamStep::new(0.9, 0.999, 1e-8, 0.0, 1e-3, 1);
        let t = wide.as_tensor();
        assert!(adam.fused(&wide, t, t, t).unwrap().is_none());
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

    /// The one-pass curvature is `sqrt(max(v̂, 0)) + ε` of the tensor path's `v̂`, to the bit.
    #[test]
    fn curvature_in_one_pass_is_the_bias_corrected_moments() {
        let var = Var::from_slice(&[0.5f32, -1.0, 0.0, 2.0], 4, &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(OptimizerSpec::adam(), std::slice::from_ref(&var)).unwrap();
        let mut out = vec![7.0];
        for step in 0..3 {
            let g = Tensor::from_slice(&[4.0f32, -0.01, 0.0, 1e-3 * step as f32], 4, &Device::Cpu)
                .unwrap();
            opt.step(std::slice::from_ref(&var), &[g], 0.01).unwrap();
            assert!(opt.curvature_into(0, 1e-8, &mut out).unwrap());
            let v_hat = opt.second_moment().unwrap()[0].to_vec1::<f32>().unwrap();
            let expected: Vec<u32> = v_hat
                .iter()
                .map(|v| (v.max(0.0).sqrt() + 1e-8).to_bits())
                .collect();
            assert_eq!(
                out.iter().map(|c| c.to_bits()).collect::<Vec<_>>(),
                expected
            );
        }
        // SGD keeps no second moment, and no parameter 1 exists.
        assert!(!opt.curvature_into(1, 1e-8, &mut out).unwrap());
        let sgd = Optimizer::new(OptimizerSpec::sgd(), std::slice::from_ref(&var)).unwrap();
        assert!(!sgd.curvature_into(0, 1e-8, &mut out).unwrap());
    }
}
