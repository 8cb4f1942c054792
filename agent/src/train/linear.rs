//! A fully connected layer on CPU as one op: `y = x Wᵀ + b`, optionally ReLU, forward and
//! backward.
//!
//! As candle tensor operations a layer is a transpose, a product, a broadcast addition and
//! a ReLU, and its backward pass a dozen more (each allocating, each accumulated into a
//! zeroed gradient); at the digits MLP's size that bookkeeping, not arithmetic, is the step.
//! Here the forward pass is one product onto the bias and the backward pass three: the bias
//! gradient (column sums), `dW = dzᵀ x` and, when the input needs one, `dx = dz W`.
//! [`linear`] runs this on CPU and candle's operations elsewhere.

use crate::train::cpu_buffers::{contiguous_f32, with_cpu_f32, written_zeros};
use crate::train::gemm::{MatRef, matmul_into_parallel};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

struct Linear {
    relu: bool,
}

/// Batch, inputs and outputs of `x` `[B, in]` and `w` `[out, in]`.
fn dims(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
    let (&[batch, inputs], &[outputs, w_inputs]) = (x, w) else {
        bail!("linear wants input [B, in] and weights [out, in], got {x:?} and {w:?}")
    };
    if inputs != w_inputs {
        bail!("linear: input has {inputs} features, weights expect {w_inputs}")
    }
    Ok((batch, inputs, outputs))
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, inputs, outputs) = dims(xl.dims(), wl.dims())?;
        let x = contiguous_f32(xs, xl, "the linear layer's input")?;
        let w = contiguous_f32(ws, wl, "the linear layer's weights")?;
        let bias = contiguous_f32(bs, bl, "the linear layer's bias")?;
        if bias.len() != outputs {
            bail!("linear: {} bias values for {outputs} outputs", bias.len())
        }
        let mut y: Vec<f32> = (0..batch).flat_map(|_| bias.iter().copied()).collect();
        matmul_into_parallel(
            &mut y,
            true,
            MatRef::row_major(x, batch, inputs),
            MatRef::row_major(w, outputs, inputs).t(),
        );
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Ok((CpuStorage::F32(y), Shape::from((batch, outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, inputs, outputs) = dims(x.dims(), w.dims())?;
        let dy = dy.contiguous()?;
        // The gradient before ReLU: zero where the output was clamped.
        let dz: Vec<f32> = with_cpu_f32(&dy, "the output gradient", |dy| {
            if !self.relu {
                return Ok(dy.to_vec());
            }
            with_cpu_f32(y, "the output", |y| {
                Ok(y.iter()
                    .zip(dy)
                    .map(|(&y, &d)| if y > 0.0 { d } else { 0.0 })
                    .collect())
            })
        })?;
        let dz_m = MatRef::row_major(&dz, batch, outputs);
        let mut db = written_zeros(outputs);
        for row in dz.chunks_exact(outputs) {
            db.iter_mut().zip(row).for_each(|(sum, v)| *sum += v);
        }
        let mut dw = written_zeros(outputs * inputs);
        with_cpu_f32(x, "the input", |x| {
            matmul_into_parallel(
                &mut dw,
                false,
                dz_m.t(),
                MatRef::row_major(x, batch, inputs),
            );
            Ok(())
        })?;
        // Data batches carry no gradient: the input's is computed only when it is needed.
        let dx = if x.track_op() {
            let mut dx = written_zeros(batch * inputs);
            with_cpu_f32(w, "the weights", |w| {
                matmul_into_parallel(&mut dx, false, dz_m, MatRef::row_major(w, outputs, inputs));
                Ok(())
            })?;
            Some(Tensor::from_vec(dx, (batch, inputs), x.device())?)
        } else {
            None
        };
        let dw = Tensor::from_vec(dw, (outputs, inputs), x.device())?;
        let db = Tensor::from_vec(db, outputs, x.device())?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// `x Wᵀ + b` for `x` `[B, in]`, `w` `[out, in]` and `b` `[out]`, then ReLU when `relu`,
/// with a backward pass: one op on CPU, candle's operations elsewhere.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let y = x.matmul(&w.t()?)?.broadcast_add(b)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear { relu })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::op_checks::{assert_same_outputs_and_gradients, values};
    use candle_core::{Device, Var};

    /// Against candle's matmul, broadcast addition and ReLU: output and every gradient, at
    /// a small size and at one large enough to use every thread.
    #[test]
    fn matches_candles_operations_forward_and_backward() {
        let dev = Device::Cpu;
        for (batch, inputs, outputs) in [(5, 7, 3), (64, 3136, 384)] {
            for relu in [false, true] {
                let x = Var::randn(0f32, 1.0, (batch, inputs), &dev).unwrap();
                let w = Var::randn(0f32, 0.1, (outputs, inputs), &dev).unwrap();
                let b = Var::randn(0f32, 0.1, outputs, &dev).unwrap();
                let ours = linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), relu).unwrap();
                let theirs = x
                    .as_tensor()
                    .matmul(&w.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_add(b.as_tensor())
                    .unwrap();
                let theirs = if relu { theirs.relu().unwrap() } else { theirs };
                if relu {
                    assert!(values(&ours).contains(&0.0), "some outputs are clamped");
                }
                let vars = [(&x, "input"), (&w, "weights"), (&b, "bias")];
                let context = format!("{batch}x{inputs}x{outputs}, relu {relu}");
                assert_same_outputs_and_gradients(ours, theirs, &vars, &context);
            }
        }
    }

    #[test]
    fn a_data_batch_gets_no_input_gradient_and_bad_shapes_are_named() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (3, 6), &dev).unwrap();
        let b = Var::zeros(3, candle_core::DType::F32, &dev).unwrap();
        let grads = linear(&x, w.as_tensor(), b.as_tensor(), false)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_none());
        assert_eq!(grads.get(w.as_tensor()).unwrap().dims(), &[3, 6]);
        let narrow = Tensor::zeros((4, 5), candle_core::DType::F32, &dev).unwrap();
        let err = linear(&narrow, w.as_tensor(), b.as_tensor(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 features, weights expect 6"), "{err}");
    }
}
